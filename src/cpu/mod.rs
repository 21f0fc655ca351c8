//! A fast BatchNorm on the CPU, storing `f32` or `f16`, computing in `f32`, on every core.
//!
//! [`CpuBatchNorm`] has the semantics of [`crate::CpuReference`] (PyTorch's) but
//! is built for speed rather than as an oracle:
//!
//! - rayon tasks over channels, and over slices of a channel when the
//!   channels are few and large; the partial statistics of the slices merge
//!   with Chan's formula in a fixed order, so a run is reproducible for a
//!   given number of threads;
//! - inner loops over contiguous runs with 16 independent `f32` lanes, which
//!   the compiler turns into SIMD code;
//! - channel-major tensors whose channels hold at most 2 MiB of the inputs
//!   run the training forward and the backward a channel at a time: the
//!   task reduces its channel, then writes `y` or `dx` while the channel is
//!   still in cache (`resident.rs`), 8 and 12 bytes of memory traffic per
//!   `f32` element instead of 12 and 20 (1.06-1.22x and 1.16-1.32x faster
//!   at 32x64x56x56 and 32x256x56x56 on 2 cores of an AMD EPYC);
//! - channels-last tensors (and channels-first ones with a spatial size below
//!   16, such as `(N, C)`) are walked row by row: a row holds every channel
//!   side by side, and per-channel vectors are accumulated instead of
//!   striding through memory.
//!
//! Statistics never use `E[x^2] - E[x]^2`. Each piece of at most 4096
//! elements is reduced by the corrected two-pass algorithm while it sits in
//! the L1/L2 cache (a first pass for its mean `m`, then `sum(x - m)` and
//! `sum((x - m)^2)`), and pieces merge in `f64`:
//!
//! ```text
//! piece:  mean_p = m + s1/n,   M2_p = s2 - s1^2/n        (s1, s2 over x - m)
//! merge:  d = mean_b - mean_a, n = n_a + n_b
//!         mean = mean_a + d n_b/n,  M2 = M2_a + M2_b + d^2 n_a n_b/n
//! ```
//!
//! so a channel with mean 300 and unit variance loses no precision. The
//! slice-based methods ([`CpuBatchNorm::forward_train_slice`] and friends)
//! skip ndarray entirely, for benchmarks and for callers with their own
//! buffers; they take `&[f32]` or `&[half::f16]` ([`CpuElement`]). f16
//! elements are loaded as `f32` and every sum is the one of `f32` storage
//! (`f32` lanes, `f64` merges); results are rounded to f16 when stored.

mod backend;
mod coefs;
mod convert;
mod elem;
mod elementwise;
mod fast32;
mod fused;
mod grad;
mod kernels;
mod lanes;
mod plan;
mod reduce;
mod resident;
mod rows;
mod sync;

pub use elem::CpuElement;
pub use elementwise::parallel_copy;

use crate::config::{BatchNormConfig, Mode};
use crate::error::{Error, Result};
use crate::fused::Activation;
use crate::layout::DType;
use crate::reference;
use crate::shape::ChannelWalk;
use crate::state::{BatchNormState, SavedBatchStats, SavedStats};
use crate::stats::{Moments, backward_stats, update_running};
use crate::sync::SYNCED_FORWARD;
use crate::validate;
use coefs::{grad_coefs, norm_coefs};
use elementwise::{Coefs, Epilogue, backward_dx, normalize};
use grad::GradIn;
use reduce::{grad_sums, local_moments};

/// BatchNorm on the CPU in `f32` arithmetic with rayon, storing `f32` or `f16`: the fast CPU backend.
///
/// Same semantics and state as [`crate::CpuReference`] (PyTorch's), within the
/// `f32` tolerance of it; per-channel statistics are merged in `f64`. Runs on
/// rayon's global pool (`RAYON_NUM_THREADS` sets its size).
///
/// Tensors are stored as `f32` or `half::f16`: the slice methods take either
/// ([`CpuElement`]); the ndarray interface ([`BatchNormBackend`](crate::BatchNormBackend))
/// rounds its inputs to the [storage type](CpuBatchNorm::set_storage_dtype)
/// and widens the outputs back to `f32`. f16 arithmetic is the `f32` one, on
/// the f16 values; parameters and statistics stay `f32`.
///
/// ```
/// use wgpu_batchnorm::{BatchNormConfig, CpuBatchNorm, Mode};
/// let mut bn = CpuBatchNorm::new(BatchNormConfig::new(2))?;
/// let dims = [2, 2, 3]; // (N, C, L)
/// let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
/// let mut y = vec![0.0; 12];
/// bn.forward_train_slice(&x, &dims, &mut y)?;
/// // channel 0 holds 0, 1, 2, 6, 7, 8: mean 4
/// assert!((bn.saved_stats().unwrap().mean[0] - 4.0).abs() < 1e-6);
/// let (mut dx, mut dw, mut db) = (vec![0.0; 12], vec![0.0; 2], vec![0.0; 2]);
/// bn.backward_slice(&x, &y, &dims, Mode::Train, &mut dx, &mut dw, &mut db)?;
/// assert!((db[0] - y[..3].iter().chain(&y[6..9]).sum::<f32>()).abs() < 1e-5);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CpuBatchNorm {
    config: BatchNormConfig,
    state: BatchNormState,
    saved: Option<SavedBatchStats>,
    /// The global count per channel when `saved` came from a synchronized
    /// forward ([`crate::sync`]), whose backward is synchronized too.
    sync_count: Option<usize>,
    /// Storage type of the ndarray interface's tensors.
    storage: DType,
}

impl CpuBatchNorm {
    /// A layer in PyTorch's initial state.
    ///
    /// # Errors
    /// [`crate::Error::Config`] when the configuration is invalid.
    pub fn new(config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let state = BatchNormState::new(&config);
        Ok(Self {
            config,
            state,
            saved: None,
            sync_count: None,
            storage: DType::F32,
        })
    }

    /// Storage type of the ndarray interface's tensors (the slice methods
    /// store their slices' element type). Default f32.
    pub fn storage_dtype(&self) -> DType {
        self.storage
    }

    /// Sets the storage type of the ndarray interface: with
    /// [`DType::F16`], inputs are rounded to f16 before computing and the
    /// outputs (`y`, `dx`) are f16 values widened to `f32`; statistics,
    /// parameters and gradients of parameters stay `f32`. Both types are
    /// supported, so this never fails; it returns `Result` as
    /// [`BatchNormBackend::set_storage_dtype`](crate::BatchNormBackend::set_storage_dtype) does.
    ///
    /// # Errors
    /// None.
    pub fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        self.storage = dtype;
        Ok(())
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Parameters and running statistics.
    pub fn state(&self) -> &BatchNormState {
        &self.state
    }

    /// Replaces parameters and running statistics.
    ///
    /// # Errors
    /// [`crate::Error::ParameterLength`], [`crate::Error::MissingParameter`].
    pub fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        state.validate(&self.config)?;
        self.state = state.clone();
        Ok(())
    }

    /// Batch statistics kept by the last forward that computed them.
    pub fn saved_stats(&self) -> Option<SavedStats> {
        self.saved.as_ref().map(SavedBatchStats::to_f32)
    }

    /// The forward in `mode` of `x` into `y`, followed by the residual and
    /// activation of `epi` in the same pass: batch statistics (kept for
    /// backward; the running ones moved in training) or the running ones.
    /// Every slice is checked before anything changes.
    fn forward_with<E: CpuElement>(
        &mut self,
        x: &[E],
        dims: &[usize],
        mode: Mode,
        epi: Epilogue<'_, E>,
        y: &mut [E],
    ) -> Result<()> {
        let batch = validate::uses_batch_stats(&self.config, mode);
        let walk = validate::input(&self.config, dims, batch)?;
        validate::slice_len("x", x.len(), &walk)?;
        if let Some(z) = epi.z {
            validate::slice_len("z", z.len(), &walk)?;
        }
        validate::slice_len("y", y.len(), &walk)?;
        if batch {
            let running = (mode == Mode::Train).then(|| walk.per_channel());
            if resident::fits::<E>(&walk, 1) {
                let (weight, bias) = self.state.affine(walk.channels);
                let eps = self.config.eps;
                let k = |ch, m: Moments| {
                    norm_coefs(m.mean, 1.0 / (m.var() + eps).sqrt(), weight[ch], bias[ch])
                };
                let moments = resident::forward(x, y, &walk, epi, k);
                self.apply_batch_stats(x, None, dims, &moments, running, epi, y);
            } else {
                let moments = local_moments(x, &walk);
                self.apply_batch_stats(x, Some(&walk), dims, &moments, running, epi, y);
            }
            self.sync_count = None;
            return Ok(());
        }
        let rm = self.state.running_mean.as_ref().expect("tracked");
        let rv = self.state.running_var.as_ref().expect("tracked");
        let (weight, bias) = self.state.affine(walk.channels);
        let coef = reference::eval_coeffs(rm, rv, &weight, &bias, self.config.eps);
        let c = walk.channels;
        let k1: Vec<f32> = coef.iter().map(|k| k.scale as f32).collect();
        let k2: Vec<f32> = coef.iter().map(|k| k.shift as f32).collect();
        let coefs = Coefs::new(&walk, [rm.clone(), k1, k2, vec![0.0; c]]);
        normalize(x, y, &walk, &coefs, epi);
        Ok(())
    }

    /// Normalizes `x` into `y` with the batch statistics `moments` (one per
    /// channel) and the epilogue `epi`, keeps them for backward, and with
    /// `running = Some(m)` moves the running statistics for `m` values per
    /// channel; `walk` is `None` for an empty part of shape `dims`. The local
    /// training forward and the synchronized one (merged moments, global
    /// count) share it.
    #[allow(clippy::too_many_arguments)]
    fn apply_batch_stats<E: CpuElement>(
        &mut self,
        x: &[E],
        walk: Option<&ChannelWalk>,
        dims: &[usize],
        moments: &[Moments],
        running: Option<usize>,
        epi: Epilogue<'_, E>,
        y: &mut [E],
    ) {
        let c = self.config.num_features;
        let (weight, bias) = self.state.affine(c);
        let stats = reference::stats_finalize(moments, self.config.eps, &weight, &bias);
        let (mut k0, mut k1, mut k2) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let k = norm_coefs(stats.mean[ch], stats.invstd[ch], weight[ch], bias[ch]);
            (k0[ch], k1[ch], k2[ch]) = (k[0], k[1], k[2]);
        }
        if let Some(walk) = walk {
            let coefs = Coefs::new(walk, [k0, k1, k2, vec![0.0; c]]);
            normalize(x, y, walk, &coefs, epi);
        }
        if let Some(m) = running {
            update_running(&mut self.state, &self.config, &stats.mean, &stats.var, m);
        }
        self.saved = Some(SavedBatchStats {
            dims: dims.to_vec(),
            mean: stats.mean,
            invstd: stats.invstd,
        });
    }

    /// Training forward on a contiguous tensor of shape `dims` (in the layer's
    /// layout) into `y`: normalizes with batch statistics, keeps them for
    /// backward and updates the running statistics when tracked. Stores
    /// `f32` or `f16` (`y` rounded to nearest), computing in `f32`.
    ///
    /// ```text
    /// y = (x - mean) / sqrt(var + eps) * weight + bias      (var biased)
    /// running_mean = (1-m) running_mean + m mean
    /// running_var  = (1-m) running_var  + m var M/(M-1)
    /// ```
    ///
    /// # Errors
    /// [`crate::Error::Rank`], [`crate::Error::ChannelMismatch`], [`crate::Error::Empty`],
    /// [`crate::Error::TooLarge`], [`crate::Error::SingleValuePerChannel`], and
    /// [`crate::Error::ShapeMismatch`] when `x` or `y` does not hold `dims`' elements.
    /// On error the layer is unchanged and `y` unwritten.
    pub fn forward_train_slice<E: CpuElement>(
        &mut self,
        x: &[E],
        dims: &[usize],
        y: &mut [E],
    ) -> Result<()> {
        self.forward_with(x, dims, Mode::Train, Epilogue::NONE, y)
    }

    /// Evaluation forward into `y`: running statistics, or batch statistics
    /// (kept for backward; running statistics untouched) when they are not tracked.
    ///
    /// ```text
    /// y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
    /// ```
    ///
    /// # Errors
    /// As [`CpuBatchNorm::forward_train_slice`]; one value per channel is an
    /// error only without tracked statistics.
    pub fn forward_eval_slice<E: CpuElement>(
        &mut self,
        x: &[E],
        dims: &[usize],
        y: &mut [E],
    ) -> Result<()> {
        self.forward_with(x, dims, Mode::Eval, Epilogue::NONE, y)
    }

    /// Backward of the forward in `mode` at input `x` with upstream gradient
    /// `dy`, into `dx` (shape `dims`), `dweight` and `dbias` (length `C`; written
    /// also without affine, as if `weight = 1`).
    ///
    /// ```text
    /// batch statistics (Mode::Train, or Mode::Eval without tracking):
    ///   dbias = sum(dy), dweight = sum(dy (x - mean)) invstd
    ///   dx = weight invstd (dy - sum(dy)/M - (x - mean) invstd^2 sum(dy (x - mean))/M)
    /// running statistics (Mode::Eval with tracking):
    ///   dx = dy weight / sqrt(running_var + eps)
    /// ```
    ///
    /// # Errors
    /// Shape errors as [`CpuBatchNorm::forward_train_slice`],
    /// [`crate::Error::ShapeMismatch`] for a slice of the wrong length,
    /// [`crate::Error::NoSavedStatistics`] when batch statistics of this shape were not
    /// computed by a forward first. On error nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_slice<E: CpuElement>(
        &mut self,
        x: &[E],
        dy: &[E],
        dims: &[usize],
        mode: Mode,
        dx: &mut [E],
        dweight: &mut [f32],
        dbias: &mut [f32],
    ) -> Result<()> {
        self.backward_with(x, dy, dims, mode, None, (dx, None, dweight, dbias))
    }

    /// The backward in `mode` at `x` of the upstream gradient `dy`, or with
    /// `gate = Some((y, activation))` of `dy` gated by the fused forward's
    /// output `y`, into `(dx, dz, dweight, dbias)`. The reductions' pass
    /// writes the gated `dy` as it reads it: into `dz` when given (a
    /// residual: also for the identity, as a copy), else into `dx`, which
    /// the `dx` pass then overwrites in place. Every slice is checked before
    /// anything is written.
    #[allow(clippy::type_complexity)]
    fn backward_with<E: CpuElement>(
        &mut self,
        x: &[E],
        dy: &[E],
        dims: &[usize],
        mode: Mode,
        gate: Option<(&[E], Activation)>,
        (dx, dz, dweight, dbias): (&mut [E], Option<&mut [E]>, &mut [f32], &mut [f32]),
    ) -> Result<()> {
        let walk = validate::input(&self.config, dims, false)?;
        validate::slice_len("x", x.len(), &walk)?;
        if let Some((y, _)) = gate {
            validate::slice_len("y", y.len(), &walk)?;
        }
        validate::slice_len("dy", dy.len(), &walk)?;
        validate::slice_len("dx", dx.len(), &walk)?;
        if let Some(dz) = &dz {
            validate::slice_len("dz", dz.len(), &walk)?;
        }
        let c = walk.channels;
        validate::channel_len("dweight", dweight.len(), c)?;
        validate::channel_len("dbias", dbias.len(), c)?;
        let batch = validate::uses_batch_stats(&self.config, mode);
        let (center, invstd) = backward_stats(
            &self.config,
            &self.state,
            self.saved.as_ref(),
            &walk.dims,
            batch,
        )?;
        if batch && self.sync_count.is_some() {
            return Err(Error::NoSavedStatistics {
                detail: SYNCED_FORWARD.into(),
            });
        }
        let m = walk.per_channel();
        let stats = (&center[..], &invstd[..]);
        let (y, activation) = gate.unwrap_or((dy, Activation::Identity));
        // Where the dx pass reads the gradient: dy itself, dz, or dx (in place).
        let (sums, g) = match dz {
            None if activation == Activation::Identity && resident::fits::<E>(&walk, 2) => {
                let (weight, _) = self.state.affine(c);
                let k =
                    |ch: usize, s| grad_coefs(weight[ch], (center[ch], invstd[ch]), s, m, batch);
                let sums = resident::backward(x, dy, dx, &walk, &center, |ch, s| k(ch, s).2);
                for (ch, &s) in sums.iter().enumerate() {
                    (dweight[ch], dbias[ch], _) = k(ch, s);
                }
                return Ok(());
            }
            None if activation == Activation::Identity => {
                (grad_sums(x, &GradIn::plain(dy), &walk, &center), Some(dy))
            }
            None => {
                let grad = GradIn::gated(dy, y, activation, &mut *dx);
                (grad_sums(x, &grad, &walk, &center), None)
            }
            Some(dz) => {
                let sums = grad_sums(
                    x,
                    &GradIn::gated(dy, y, activation, &mut *dz),
                    &walk,
                    &center,
                );
                (sums, Some(&*dz))
            }
        };
        let out = (dx, dweight, dbias);
        self.apply_grad_sums_to(x, g, Some(&walk), stats, &sums, m, batch, out);
        Ok(())
    }

    /// Writes `dx`, `dweight` and `dbias` from the per-channel sums
    /// `(sum_dy, sum_dy_xmu)` of `m` values per channel around `center` with
    /// `invstd`, the upstream gradient read from `dy`, or from `dx` itself
    /// when `None`; `walk` is `None` for an empty part. The local backward and
    /// the synchronized one (sums of all ranks, global count) share it.
    #[allow(clippy::too_many_arguments)]
    fn apply_grad_sums_to<E: CpuElement>(
        &self,
        x: &[E],
        dy: Option<&[E]>,
        walk: Option<&ChannelWalk>,
        (center, invstd): (&[f64], &[f64]),
        sums: &[(f64, f64)],
        m: usize,
        batch: bool,
        (dx, dweight, dbias): (&mut [E], &mut [f32], &mut [f32]),
    ) {
        let c = self.config.num_features;
        let (weight, _) = self.state.affine(c);
        let mut k = [
            vec![0.0f32; c],
            vec![0.0f32; c],
            vec![0.0f32; c],
            vec![0.0f32; c],
        ];
        for ch in 0..c {
            let (dw, db, kc) = grad_coefs(weight[ch], (center[ch], invstd[ch]), sums[ch], m, batch);
            (dweight[ch], dbias[ch]) = (dw, db);
            for (k, v) in k.iter_mut().zip(kc) {
                k[ch] = v;
            }
        }
        if let Some(walk) = walk {
            backward_dx(x, dy, dx, walk, &Coefs::new(walk, k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn slice_length_errors_leave_the_layer_unchanged() {
        let mut bn = CpuBatchNorm::new(BatchNormConfig::new(3)).unwrap();
        let before = bn.state().clone();
        let x = vec![1.0f32; 12];
        let mut y = vec![0.0f32; 11];
        let e = bn.forward_train_slice(&x, &[4, 3], &mut y).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("y (a slice of 11 elements)"), "{e}");
        assert_eq!(bn.state(), &before);
        assert!(bn.saved_stats().is_none());
        let e = bn
            .forward_train_slice(&x[..3], &[1, 3], &mut y[..3])
            .unwrap_err();
        assert!(matches!(e, Error::SingleValuePerChannel { .. }), "{e}");
        assert_eq!(bn.state(), &before);
    }
}

//! The CPU reference: the oracle every other backend is checked against.
//!
//! It accumulates in `f64` and has one function per GPU stage, named as the
//! shader and the host function that run it (`stats_partial` ~
//! `shaders/stats_partial.wgsl` ~ `GpuBatchNorm::stats_partial`, and so on:
//! `stats_finalize`, `normalize`, `eval_coeffs`, `backward_partial`,
//! `backward_finalize`, `backward_dx`), so a reader can hold one beside the
//! other. The fused op (`y = act(BN(x) + z)`, [`crate::Fusion`]) adds
//! [`normalize_fused`] (the normalize pass with the residual and the
//! activation) and [`backward_gate`] (the upstream gradient the activation
//! lets through). It is not the fast path.

use crate::config::BatchNormConfig;
use crate::error::Result;
use crate::fused::Activation;
use crate::layout::DType;
use crate::shape::ChannelWalk;
use crate::state::{BatchNormState, Gradients, SavedBatchStats};
use crate::stats::{Moments, update_running};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

mod backend;
mod sync;

/// Per-channel coefficients of the elementwise pass:
/// `y = (x - center) * scale + shift`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormalizeCoef {
    /// Subtracted first (batch or running mean).
    pub center: f64,
    /// `weight * invstd`.
    pub scale: f64,
    /// `bias`.
    pub shift: f64,
}

/// Per-channel coefficients of the input gradient:
/// `dx = a * dy + b * (x - center) + c`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DxCoef {
    /// Mean the input is centred on.
    pub center: f64,
    /// Factor of `dy`.
    pub a: f64,
    /// Factor of `x - center`.
    pub b: f64,
    /// Constant term.
    pub c: f64,
}

/// Training statistics, stage 1 (`shaders/stats_partial.wgsl`): count, mean
/// and `M2` of each slice of `slice_len` elements of each channel (index
/// `c * slices + s`), by a two-pass sum in `f64`.
///
/// ```text
/// mean = sum(x) / n
/// M2   = sum((x - mean)^2)
/// ```
pub fn stats_partial(x: &[f32], walk: &ChannelWalk, slice_len: usize) -> Vec<Moments> {
    let m = walk.per_channel();
    let slice_len = slice_len.clamp(1, m);
    let slices = m.div_ceil(slice_len);
    (0..walk.channels * slices)
        .map(|t| {
            let (c, s) = (t / slices, t % slices);
            let (begin, end) = (s * slice_len, ((s + 1) * slice_len).min(m));
            let n = (end - begin) as f64;
            let sum: f64 = (begin..end).map(|j| x[walk.index(c, j)] as f64).sum();
            let mean = sum / n;
            let m2: f64 = (begin..end)
                .map(|j| {
                    let d = x[walk.index(c, j)] as f64 - mean;
                    d * d
                })
                .sum();
            Moments { n, mean, m2 }
        })
        .collect()
}

/// Batch statistics of every channel and the coefficients of the normalize pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Batch mean.
    pub mean: Vec<f64>,
    /// Biased batch variance.
    pub var: Vec<f64>,
    /// `1 / sqrt(var + eps)`.
    pub invstd: Vec<f64>,
    /// Coefficients of [`normalize`].
    pub coef: Vec<NormalizeCoef>,
}

/// Training statistics, stage 2 (`shaders/stats_finalize.wgsl`): per channel,
/// Chan-merges the slices of [`stats_partial`] into the batch mean and biased
/// variance, and gives `invstd` and the coefficients of [`normalize`]. (The
/// shader also moves the running statistics; here that is
/// `BatchNormState`'s update, shared with the fast CPU backend.)
///
/// ```text
/// var    = M2 / M
/// invstd = 1 / sqrt(var + eps)
/// y      = (x - mean) * (weight * invstd) + bias
/// ```
pub fn stats_finalize(partials: &[Moments], eps: f64, weight: &[f64], bias: &[f64]) -> BatchStats {
    let channels = weight.len();
    let slices = partials.len() / channels.max(1);
    let merged: Vec<Moments> = partials
        .chunks(slices.max(1))
        .map(|p| p.iter().fold(Moments::default(), |a, &b| a.merge(b)))
        .collect();
    let mean: Vec<f64> = merged.iter().map(|m| m.mean).collect();
    let var: Vec<f64> = merged.iter().map(|m| m.var()).collect();
    let invstd: Vec<f64> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let coef = (0..channels)
        .map(|c| NormalizeCoef {
            center: mean[c],
            scale: weight[c] * invstd[c],
            shift: bias[c],
        })
        .collect();
    BatchStats {
        mean,
        var,
        invstd,
        coef,
    }
}

/// Evaluation coefficients (`shaders/eval_coeffs.wgsl`): the normalize pass
/// centred on the running mean.
///
/// ```text
/// scale = weight / sqrt(running_var + eps),  shift = bias
/// ```
pub fn eval_coeffs(
    running_mean: &[f32],
    running_var: &[f32],
    weight: &[f64],
    bias: &[f64],
    eps: f64,
) -> Vec<NormalizeCoef> {
    (0..running_mean.len())
        .map(|c| NormalizeCoef {
            center: running_mean[c] as f64,
            scale: weight[c] / (running_var[c] as f64 + eps).sqrt(),
            shift: bias[c],
        })
        .collect()
}

/// The elementwise pass (`shaders/normalize.wgsl`, `normalize_vec4.wgsl`):
/// `y = (x - center[c]) * scale[c] + shift[c]`, rounded to `f32`.
pub fn normalize(x: &[f32], walk: &ChannelWalk, coef: &[NormalizeCoef]) -> Vec<f32> {
    normalize_fused(x, None, walk, coef, Activation::Identity)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// The fused forward's elementwise pass: [`normalize`], then the residual
/// `z` added when given, then `activation`, all in `f64` and not rounded
/// (the caller rounds once, to the storage type).
///
/// ```text
/// y = act((x - center[c]) * scale[c] + shift[c] + z)        act: identity or ReLU
/// ```
pub fn normalize_fused(
    x: &[f32],
    z: Option<&[f32]>,
    walk: &ChannelWalk,
    coef: &[NormalizeCoef],
    activation: Activation,
) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = coef[walk.channel_of(i)];
            let bn = (f64::from(v) - k.center) * k.scale + k.shift;
            activation.apply(match z {
                Some(z) => bn + f64::from(z[i]),
                None => bn,
            })
        })
        .collect()
}

/// The fused backward's first step: the upstream gradient `dy` that the
/// activation lets through at the fused forward's output `y`
/// ([`Activation::gate`]); the residual's gradient `dz`, and what the
/// BatchNorm's backward stages take as their `dy`.
///
/// ```text
/// identity: g = dy          ReLU: g = (y <= 0) ? 0 : dy      (a NaN y lets dy through)
/// ```
pub fn backward_gate(y: &[f32], dy: &[f32], activation: Activation) -> Vec<f32> {
    y.iter()
        .zip(dy)
        .map(|(&y, &g)| activation.gate(f64::from(y), f64::from(g)) as f32)
        .collect()
}

/// Backward, stage 1 (`shaders/backward_partial.wgsl`): `S1 = sum(dy)` and
/// `S2 = sum(dy * (x - center))` of every channel.
pub fn backward_partial(
    x: &[f32],
    dy: &[f32],
    walk: &ChannelWalk,
    center: &[f64],
) -> Vec<(f64, f64)> {
    let m = walk.per_channel();
    (0..walk.channels)
        .map(|c| {
            (0..m).fold((0.0, 0.0), |(s1, s2), j| {
                let i = walk.index(c, j);
                let g = dy[i] as f64;
                (s1 + g, s2 + g * (x[i] as f64 - center[c]))
            })
        })
        .collect()
}

/// Backward, stage 2 (`shaders/backward_finalize.wgsl`): gradients of the
/// parameters and the coefficients of `dx`.
///
/// ```text
/// batch statistics:   dbias = S1, dweight = S2 * invstd,
///                     dx = w*invstd*(dy - S1/M - (x-mean)*invstd^2*S2/M)
/// running statistics: dbias = S1, dweight = S2 * invstd, dx = w*invstd*dy
/// ```
pub fn backward_finalize(
    sums: (f64, f64),
    center: f64,
    invstd: f64,
    weight: f64,
    m: usize,
    batch_stats: bool,
) -> (f64, f64, DxCoef) {
    let (s1, s2) = sums;
    let k = weight * invstd;
    let coef = if batch_stats {
        let mf = m as f64;
        DxCoef {
            center,
            a: k,
            b: -k * invstd * invstd * s2 / mf,
            c: -k * s1 / mf,
        }
    } else {
        DxCoef {
            center,
            a: k,
            b: 0.0,
            c: 0.0,
        }
    };
    (s2 * invstd, s1, coef)
}

/// Backward, stage 3 (`shaders/backward_dx.wgsl`, `backward_dx_vec4.wgsl`):
/// `dx = a*dy + b*(x - center) + c`, rounded to `f32`.
pub fn backward_dx(x: &[f32], dy: &[f32], walk: &ChannelWalk, coef: &[DxCoef]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .enumerate()
        .map(|(i, (&v, &g))| {
            let k = coef[walk.channel_of(i)];
            // b = 0 (running statistics) drops the x term, as PyTorch's
            // evaluation backward, which never reads x, does.
            let xt = if k.b == 0.0 {
                0.0
            } else {
                k.b * (v as f64 - k.center)
            };
            (k.a * g as f64 + xt + k.c) as f32
        })
        .collect()
}

/// BatchNorm on the CPU in `f64`: the reference implementation.
///
/// ```
/// use ndarray::ArrayD;
/// use wgpu_batchnorm::{BatchNormBackend, BatchNormConfig, CpuReference};
/// let mut bn = CpuReference::new(BatchNormConfig::new(2))?;
/// let x = ArrayD::from_shape_vec(vec![2, 2], vec![1.0, 10.0, 3.0, 30.0]).unwrap();
/// let y = bn.forward_train(x.view())?;
/// assert!((y[[0, 0]] + 1.0).abs() < 1e-3 && (y[[1, 1]] - 1.0).abs() < 1e-3);
/// assert_eq!(bn.state()?.num_batches_tracked, Some(1));
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CpuReference {
    config: BatchNormConfig,
    state: BatchNormState,
    saved: Option<SavedBatchStats>,
    /// The global count per channel when `saved` came from a synchronized
    /// forward ([`crate::sync`]), whose backward is synchronized too.
    sync_count: Option<usize>,
    storage: DType,
}

impl CpuReference {
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

    /// `x` in standard order, rounded to the storage type.
    fn stored(&self, x: &ArrayViewD<'_, f32>) -> Vec<f32> {
        x.iter().map(|&v| self.storage.round(v)).collect()
    }

    /// An output tensor, rounded to the storage type.
    fn output(&self, walk: &ChannelWalk, mut v: Vec<f32>) -> ArrayD<f32> {
        if self.storage != DType::F32 {
            v.iter_mut().for_each(|e| *e = self.storage.round(*e));
        }
        ArrayD::from_shape_vec(IxDyn(&walk.dims), v).expect("shape of x")
    }

    /// `f64` values rounded once, to the storage type, in `f32`.
    fn rounded(&self, v: Vec<f64>) -> Vec<f32> {
        match self.storage {
            DType::F32 => v.into_iter().map(|e| e as f32).collect(),
            DType::F16 => v
                .into_iter()
                .map(|e| half::f16::from_f64(e).to_f32())
                .collect(),
        }
    }

    /// `(weight, bias)` per channel in `f64`; `(1, 0)` without affine.
    fn affine(&self) -> (Vec<f64>, Vec<f64>) {
        self.state.affine(self.config.num_features)
    }

    /// Normalizes `xs` (walked by `walk`, `None` for an empty part of shape
    /// `dims`) with the batch statistics `moments` (one per channel), then
    /// adds the residual and applies the activation of `post`, unrounded;
    /// keeps the statistics for backward, and with `running = Some(m)` moves
    /// the running statistics for `m` values per channel. The local training
    /// forward and the synchronized one (merged moments, global count) share it.
    fn apply_batch_stats(
        &mut self,
        xs: &[f32],
        walk: Option<&ChannelWalk>,
        dims: &[usize],
        moments: &[Moments],
        running: Option<usize>,
        (z, activation): (Option<&[f32]>, Activation),
    ) -> Vec<f64> {
        let (weight, bias) = self.affine();
        let stats = stats_finalize(moments, self.config.eps, &weight, &bias);
        let y = walk.map_or_else(Vec::new, |w| {
            normalize_fused(xs, z, w, &stats.coef, activation)
        });
        if let Some(m) = running {
            update_running(&mut self.state, &self.config, &stats.mean, &stats.var, m);
        }
        self.saved = Some(SavedBatchStats {
            dims: dims.to_vec(),
            mean: stats.mean,
            invstd: stats.invstd,
        });
        y
    }

    /// The gradients from the per-channel sums `(sum_dy, sum_dy_xmu)` of
    /// `m` values per channel around `center` with `invstd` (see
    /// [`backward_finalize`]); `walk` is `None` for an empty part of shape
    /// `dims`. The local backward and the synchronized one (sums of all
    /// ranks, global count) share it.
    #[allow(clippy::too_many_arguments)]
    fn apply_grad_sums_to(
        &self,
        xs: &[f32],
        dys: &[f32],
        walk: Option<&ChannelWalk>,
        dims: &[usize],
        (center, invstd): (&[f64], &[f64]),
        sums: &[(f64, f64)],
        m: usize,
        batch: bool,
    ) -> Gradients {
        let channels = self.config.num_features;
        let (weight, _) = self.affine();
        let mut dweight = Vec::with_capacity(channels);
        let mut dbias = Vec::with_capacity(channels);
        let mut coef = Vec::with_capacity(channels);
        for c in 0..channels {
            let (dw, db, k) = backward_finalize(sums[c], center[c], invstd[c], weight[c], m, batch);
            dweight.push(dw as f32);
            dbias.push(db as f32);
            coef.push(k);
        }
        let dx = match walk {
            Some(w) => self.output(w, backward_dx(xs, dys, w, &coef)),
            None => ArrayD::from_shape_vec(IxDyn(dims), Vec::new()).expect("an empty shape"),
        };
        let affine = self.config.affine;
        Gradients {
            dx,
            dweight: affine.then_some(dweight),
            dbias: affine.then_some(dbias),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    #[test]
    fn slices_merge_to_the_statistics_of_the_whole_channel() {
        let walk = ChannelWalk::new(&[3, 2, 7], Layout::ChannelsFirst).unwrap();
        let x: Vec<f32> = (0..walk.len())
            .map(|i| 300.0 + ((i * 37) % 11) as f32 * 0.25)
            .collect();
        let (w, b) = (vec![1.5, 0.5], vec![0.0, 2.0]);
        let whole = stats_finalize(&stats_partial(&x, &walk, walk.per_channel()), 1e-5, &w, &b);
        // 21 values per channel in slices of 4: five full slices and one of 1.
        let partials = stats_partial(&x, &walk, 4);
        assert_eq!(partials.len(), 2 * 6);
        assert_eq!(partials[5].n, 1.0);
        let sliced = stats_finalize(&partials, 1e-5, &w, &b);
        for (c, &shift) in b.iter().enumerate() {
            assert!((whole.mean[c] - sliced.mean[c]).abs() < 1e-12 * whole.mean[c].abs());
            assert!((whole.var[c] - sliced.var[c]).abs() < 1e-9 * whole.var[c]);
            assert!(whole.var[c] > 0.0);
            assert_eq!(sliced.coef[c].shift, shift);
        }
    }
}

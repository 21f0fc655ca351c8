//! The CPU reference: the oracle every other backend is checked against.
//!
//! It accumulates in `f64` and mirrors the GPU passes stage by stage
//! (`stats` ~ `shaders/stats_partial.wgsl` + `shaders/stats_finalize.wgsl`,
//! `normalize` ~ `shaders/normalize.wgsl`, `backward_reduce` ~
//! `shaders/backward_partial.wgsl`, `backward_finalize` ~
//! `shaders/backward_finalize.wgsl`, `backward_dx` ~ `shaders/backward_dx.wgsl`),
//! so a reader can hold one beside the other. It is not the fast path.

use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, DType, Mode};
use crate::error::{Error, Result};
use crate::shape::ChannelWalk;
use crate::state::{BatchNormState, Gradients, SavedStats};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

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

/// Batch mean and biased variance of every channel, by a two-pass sum in `f64`.
///
/// ```text
/// mean = sum(x) / M
/// var  = sum((x - mean)^2) / M
/// ```
pub fn stats(x: &[f32], walk: &ChannelWalk) -> Vec<(f64, f64)> {
    let m = walk.per_channel();
    (0..walk.channels)
        .map(|c| {
            let sum: f64 = (0..m).map(|j| x[walk.index(c, j)] as f64).sum();
            let mean = sum / m as f64;
            let ss: f64 = (0..m)
                .map(|j| {
                    let d = x[walk.index(c, j)] as f64 - mean;
                    d * d
                })
                .sum();
            (mean, ss / m as f64)
        })
        .collect()
}

/// `y = (x - center[c]) * scale[c] + shift[c]`, rounded to `f32`.
pub fn normalize(x: &[f32], walk: &ChannelWalk, coef: &[NormalizeCoef]) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = coef[walk.channel_of(i)];
            ((v as f64 - k.center) * k.scale + k.shift) as f32
        })
        .collect()
}

/// `S1 = sum(dy)` and `S2 = sum(dy * (x - center))` of every channel.
pub fn backward_reduce(
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

/// Gradients of the parameters and the coefficients of `dx`.
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

/// Checks `x` against the layer and walks it; `batch_stats` asks for M > 1.
pub(crate) fn input_walk(
    config: &BatchNormConfig,
    dims: &[usize],
    batch_stats: bool,
) -> Result<ChannelWalk> {
    let walk = ChannelWalk::for_features(dims, config.layout, config.num_features)?;
    if batch_stats {
        walk.check_trainable()?;
    }
    Ok(walk)
}

/// Checks that `dy` has the shape of `x`.
pub(crate) fn check_same_shape(x: &[usize], dy: &[usize]) -> Result<()> {
    if x != dy {
        return Err(Error::ShapeMismatch {
            what: "dy".into(),
            expected: x.to_vec(),
            got: dy.to_vec(),
        });
    }
    Ok(())
}

/// Whether a call in `mode` normalizes with batch statistics.
pub(crate) fn uses_batch_stats(config: &BatchNormConfig, mode: Mode) -> bool {
    mode == Mode::Train || !config.track_running_stats
}

#[derive(Debug, Clone)]
struct Saved {
    dims: Vec<usize>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
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
    saved: Option<Saved>,
    storage: DType,
}

impl CpuReference {
    /// A layer in PyTorch's initial state.
    ///
    /// # Errors
    /// [`Error::Config`] when the configuration is invalid.
    pub fn new(config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let state = BatchNormState::new(&config);
        Ok(Self {
            config,
            state,
            saved: None,
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

    fn weight(&self, c: usize) -> f64 {
        self.state.weight.as_ref().map_or(1.0, |w| w[c] as f64)
    }

    fn bias(&self, c: usize) -> f64 {
        self.state.bias.as_ref().map_or(0.0, |b| b[c] as f64)
    }

    fn batch_forward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        update_running: bool,
    ) -> Result<ArrayD<f32>> {
        let walk = input_walk(&self.config, x.shape(), true)?;
        let xs = &self.stored(&x)[..];
        let eps = self.config.eps;
        let stats = stats(xs, &walk);
        let invstd: Vec<f64> = stats.iter().map(|&(_, v)| 1.0 / (v + eps).sqrt()).collect();
        let coef: Vec<NormalizeCoef> = (0..walk.channels)
            .map(|c| NormalizeCoef {
                center: stats[c].0,
                scale: self.weight(c) * invstd[c],
                shift: self.bias(c),
            })
            .collect();
        let y = normalize(xs, &walk, &coef);
        if update_running && self.config.track_running_stats {
            let nbt = self.state.num_batches_tracked.unwrap_or(0) + 1;
            let f = self.config.momentum_factor(nbt);
            let m = walk.per_channel() as f64;
            let rm = self.state.running_mean.as_mut().expect("tracked");
            let rv = self.state.running_var.as_mut().expect("tracked");
            for c in 0..walk.channels {
                let (mean, var) = stats[c];
                rm[c] = ((1.0 - f) * rm[c] as f64 + f * mean) as f32;
                rv[c] = ((1.0 - f) * rv[c] as f64 + f * var * m / (m - 1.0)) as f32;
            }
            self.state.num_batches_tracked = Some(nbt);
        }
        self.saved = Some(Saved {
            dims: walk.dims.clone(),
            mean: stats.iter().map(|s| s.0).collect(),
            invstd,
        });
        Ok(self.output(&walk, y))
    }
}

impl BatchNormBackend for CpuReference {
    fn backend_name(&self) -> String {
        "cpu-reference".into()
    }

    fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.batch_forward(x, true)
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        if !self.config.track_running_stats {
            return self.batch_forward(x, false);
        }
        let walk = input_walk(&self.config, x.shape(), false)?;
        let xs = &self.stored(&x)[..];
        let rm = self.state.running_mean.as_ref().expect("tracked");
        let rv = self.state.running_var.as_ref().expect("tracked");
        let coef: Vec<NormalizeCoef> = (0..walk.channels)
            .map(|c| NormalizeCoef {
                center: rm[c] as f64,
                scale: self.weight(c) / (rv[c] as f64 + self.config.eps).sqrt(),
                shift: self.bias(c),
            })
            .collect();
        let y = normalize(xs, &walk, &coef);
        Ok(self.output(&walk, y))
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        let batch = uses_batch_stats(&self.config, mode);
        let walk = input_walk(&self.config, x.shape(), false)?;
        check_same_shape(x.shape(), dy.shape())?;
        let (center, invstd): (Vec<f64>, Vec<f64>) = if batch {
            match &self.saved {
                Some(s) if s.dims == walk.dims => (s.mean.clone(), s.invstd.clone()),
                Some(s) => {
                    return Err(Error::NoSavedStatistics {
                        detail: format!(" (saved for shape {:?}, got {:?})", s.dims, walk.dims),
                    });
                }
                None => {
                    return Err(Error::NoSavedStatistics {
                        detail: String::new(),
                    });
                }
            }
        } else {
            let rm = self.state.running_mean.as_ref().expect("tracked");
            let rv = self.state.running_var.as_ref().expect("tracked");
            (
                rm.iter().map(|&v| v as f64).collect(),
                rv.iter()
                    .map(|&v| 1.0 / (v as f64 + self.config.eps).sqrt())
                    .collect(),
            )
        };
        let xs = &self.stored(&x)[..];
        let dys = &self.stored(&dy)[..];
        let sums = backward_reduce(xs, dys, &walk, &center);
        let m = walk.per_channel();
        let mut dweight = Vec::with_capacity(walk.channels);
        let mut dbias = Vec::with_capacity(walk.channels);
        let mut coef = Vec::with_capacity(walk.channels);
        for c in 0..walk.channels {
            let (dw, db, k) =
                backward_finalize(sums[c], center[c], invstd[c], self.weight(c), m, batch);
            dweight.push(dw as f32);
            dbias.push(db as f32);
            coef.push(k);
        }
        let dx = backward_dx(xs, dys, &walk, &coef);
        let affine = self.config.affine;
        Ok(Gradients {
            dx: self.output(&walk, dx),
            dweight: affine.then_some(dweight),
            dbias: affine.then_some(dbias),
        })
    }

    fn saved_stats(&self) -> Result<Option<SavedStats>> {
        Ok(self.saved.as_ref().map(|s| SavedStats {
            mean: s.mean.iter().map(|&v| v as f32).collect(),
            invstd: s.invstd.iter().map(|&v| v as f32).collect(),
        }))
    }

    fn state(&self) -> Result<BatchNormState> {
        Ok(self.state.clone())
    }

    fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        state.validate(&self.config)?;
        self.state = state.clone();
        Ok(())
    }

    fn storage_dtype(&self) -> DType {
        self.storage
    }

    /// The reference emulates f16 storage: inputs and the big outputs are
    /// rounded to f16, the arithmetic stays f64.
    fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        self.storage = dtype;
        Ok(())
    }
}

//! Parameters and running statistics of a BatchNorm layer, with PyTorch's names.

use crate::config::BatchNormConfig;

/// Learnable parameters and running statistics, as PyTorch's `state_dict` names them.
///
/// Fields that the configuration does not have (`weight`/`bias` without `affine`,
/// the running statistics without `track_running_stats`) are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormState {
    /// Scale `gamma`, length `C` (affine only).
    pub weight: Option<Vec<f32>>,
    /// Shift `beta`, length `C` (affine only).
    pub bias: Option<Vec<f32>>,
    /// Running mean, length `C` (tracking only).
    pub running_mean: Option<Vec<f32>>,
    /// Running (unbiased) variance, length `C` (tracking only).
    pub running_var: Option<Vec<f32>>,
    /// Training steps counted so far (tracking only).
    pub num_batches_tracked: Option<u64>,
}

impl BatchNormState {
    /// PyTorch's initial state: `weight = 1`, `bias = 0`, `running_mean = 0`,
    /// `running_var = 1`, `num_batches_tracked = 0`.
    pub fn new(config: &BatchNormConfig) -> Self {
        let c = config.num_features;
        let (affine, track) = (config.affine, config.track_running_stats);
        Self {
            weight: affine.then(|| vec![1.0; c]),
            bias: affine.then(|| vec![0.0; c]),
            running_mean: track.then(|| vec![0.0; c]),
            running_var: track.then(|| vec![1.0; c]),
            num_batches_tracked: track.then_some(0),
        }
    }
}

impl BatchNormState {
    /// `(weight, bias)` of `channels` channels in `f64`; `(1, 0)` where the
    /// layer is not affine.
    pub(crate) fn affine(&self, channels: usize) -> (Vec<f64>, Vec<f64>) {
        let widen = |v: &Option<Vec<f32>>, default: f64| match v {
            Some(v) => v.iter().map(|&e| f64::from(e)).collect(),
            None => vec![default; channels],
        };
        (widen(&self.weight, 1.0), widen(&self.bias, 0.0))
    }
}

/// Batch statistics kept by a forward pass for backward (PyTorch's `save_mean`, `save_invstd`).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedStats {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// `1 / sqrt(biased_var + eps)` per channel.
    pub invstd: Vec<f32>,
}

/// Result of a backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// Gradient with respect to the input, same shape and layout.
    pub dx: ndarray::ArrayD<f32>,
    /// Gradient with respect to `weight` (affine only).
    pub dweight: Option<Vec<f32>>,
    /// Gradient with respect to `bias` (affine only).
    pub dbias: Option<Vec<f32>>,
}

/// The batch statistics a forward saved for backward, in `f64`, with the
/// shape of the input they belong to (the CPU backends' `save_mean`,
/// `save_invstd`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedBatchStats {
    /// Shape of the forward's input.
    pub dims: Vec<usize>,
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// `1 / sqrt(biased_var + eps)` per channel.
    pub invstd: Vec<f64>,
}

impl SavedBatchStats {
    /// The statistics rounded to `f32`, as [`SavedStats`].
    pub fn to_f32(&self) -> SavedStats {
        SavedStats {
            mean: self.mean.iter().map(|&v| v as f32).collect(),
            invstd: self.invstd.iter().map(|&v| v as f32).collect(),
        }
    }
}

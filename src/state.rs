//! Parameters and running statistics of a BatchNorm layer, with PyTorch's names.

use crate::config::BatchNormConfig;
use crate::error::{Error, Result};

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

    /// Checks that the fields present are exactly those `config` has, with length `C`.
    ///
    /// # Errors
    /// [`Error::ParameterLength`] for a wrong length, [`Error::MissingParameter`] for a
    /// field that is missing or that the configuration rules out.
    pub fn validate(&self, config: &BatchNormConfig) -> Result<()> {
        let c = config.num_features;
        let vectors = [
            ("weight", &self.weight, config.affine, "affine"),
            ("bias", &self.bias, config.affine, "affine"),
            (
                "running_mean",
                &self.running_mean,
                config.track_running_stats,
                "track_running_stats",
            ),
            (
                "running_var",
                &self.running_var,
                config.track_running_stats,
                "track_running_stats",
            ),
        ];
        for (name, value, wanted, flag) in vectors {
            match (value, wanted) {
                (Some(v), true) if v.len() != c => {
                    return Err(Error::ParameterLength {
                        name: name.into(),
                        expected: c,
                        got: v.len(),
                    });
                }
                (Some(_), false) => {
                    return Err(Error::MissingParameter {
                        name: name.into(),
                        why: format!("the layer was configured with {flag} = false"),
                    });
                }
                (None, true) => {
                    return Err(Error::MissingParameter {
                        name: name.into(),
                        why: format!("the layer has {flag} = true and needs it"),
                    });
                }
                _ => {}
            }
        }
        match (self.num_batches_tracked, config.track_running_stats) {
            (Some(_), false) => Err(Error::MissingParameter {
                name: "num_batches_tracked".into(),
                why: "the layer was configured with track_running_stats = false".into(),
            }),
            (None, true) => Err(Error::MissingParameter {
                name: "num_batches_tracked".into(),
                why: "the layer has track_running_stats = true and needs it".into(),
            }),
            _ => Ok(()),
        }
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

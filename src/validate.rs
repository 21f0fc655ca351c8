//! Every check of a layer's configuration, state and inputs, in one place.
//!
//! Each backend (the CPU reference, the fast CPU backend, the GPU) calls these
//! before it changes anything, so a failed call leaves the layer as it was and
//! every backend names a bad input the same way.

use crate::config::{BatchNormConfig, Mode};
use crate::error::{Error, Result};
use crate::layout::{DType, Layout};
use crate::shape::ChannelWalk;
use crate::state::BatchNormState;

impl BatchNormConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Config`] when `num_features` is 0 or exceeds `u32::MAX`, `eps` is not
    /// finite or `<= 0` or below the smallest normal f32 (`1.18e-38`: the
    /// kernels compute in f32, and GPUs may flush smaller values to 0), or
    /// `momentum` is not finite or lies outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.num_features == 0 {
            return Err(Error::Config(
                "num_features must be at least 1, got 0".into(),
            ));
        }
        if self.num_features > u32::MAX as usize {
            return Err(Error::Config(format!(
                "num_features {} exceeds u32::MAX",
                self.num_features
            )));
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(Error::Config(format!(
                "eps must be finite and > 0, got {}",
                self.eps
            )));
        }
        if self.eps < f64::from(f32::MIN_POSITIVE) {
            return Err(Error::Config(format!(
                "eps = {:e} is below the smallest normal f32 ({:e}), which the kernels compute in; it would round to 0 or be flushed to 0",
                self.eps,
                f32::MIN_POSITIVE
            )));
        }
        if self.eps > f64::from(f32::MAX) {
            return Err(Error::Config(format!(
                "eps = {:e} is above the largest f32 ({:e}), which the kernels compute in",
                self.eps,
                f32::MAX
            )));
        }
        if let Some(m) = self.momentum
            && (!m.is_finite() || !(0.0..=1.0).contains(&m))
        {
            return Err(Error::Config(format!(
                "momentum must lie in [0, 1] (or be None for a cumulative average), got {m}"
            )));
        }
        Ok(())
    }
}

impl BatchNormState {
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

/// Checks an input of shape `dims` against the layer and walks it;
/// `batch_stats` (a call that normalizes with batch statistics) asks for
/// more than one value per channel, as PyTorch does.
///
/// # Errors
/// [`Error::Rank`], [`Error::Empty`], [`Error::TooLarge`],
/// [`Error::ChannelMismatch`], [`Error::SingleValuePerChannel`].
pub(crate) fn input(
    config: &BatchNormConfig,
    dims: &[usize],
    batch_stats: bool,
) -> Result<ChannelWalk> {
    let walk = ChannelWalk::for_features(dims, config.layout, config.num_features)?;
    if batch_stats && walk.per_channel() < 2 {
        return Err(Error::SingleValuePerChannel {
            shape: walk.dims.clone(),
        });
    }
    Ok(walk)
}

/// Checks the input `x` and upstream gradient `dy` of a backward, in that
/// order, and walks `x`.
///
/// # Errors
/// As [`input`], and [`Error::ShapeMismatch`] naming `dy` when its shape differs.
pub(crate) fn backward_input(
    config: &BatchNormConfig,
    x: &[usize],
    dy: &[usize],
) -> Result<ChannelWalk> {
    let walk = input(config, x, false)?;
    same_shape("dy", x, dy)?;
    Ok(walk)
}

/// Whether a call in `mode` normalizes with batch statistics.
pub(crate) fn uses_batch_stats(config: &BatchNormConfig, mode: Mode) -> bool {
    mode == Mode::Train || !config.track_running_stats
}

/// Checks that tensor `what` has shape `expected`.
///
/// # Errors
/// [`Error::ShapeMismatch`].
pub(crate) fn same_shape(what: &str, expected: &[usize], got: &[usize]) -> Result<()> {
    if expected != got {
        return Err(Error::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// Checks that a flat slice `what` of `len` elements holds the tensor `walk` describes.
///
/// # Errors
/// [`Error::ShapeMismatch`].
pub(crate) fn slice_len(what: &str, len: usize, walk: &ChannelWalk) -> Result<()> {
    if len != walk.len() {
        return Err(Error::ShapeMismatch {
            what: format!("{what} (a slice of {len} elements)"),
            expected: walk.dims.clone(),
            got: vec![len],
        });
    }
    Ok(())
}

/// Checks that a per-channel output `what` has length `channels`.
///
/// # Errors
/// [`Error::ShapeMismatch`].
pub(crate) fn channel_len(what: &str, len: usize, channels: usize) -> Result<()> {
    same_shape(what, &[channels], &[len])
}

/// Checks that the batch statistics a backward needs were saved for its shape:
/// `saved` is the shape of the forward that saved them, if any.
///
/// # Errors
/// [`Error::NoSavedStatistics`], naming both shapes when they differ.
pub(crate) fn saved_shape(saved: Option<&[usize]>, dims: &[usize]) -> Result<()> {
    match saved {
        Some(d) if d == dims => Ok(()),
        Some(d) => Err(Error::NoSavedStatistics {
            detail: format!(" (saved for shape {d:?}, got {dims:?})"),
        }),
        None => Err(Error::NoSavedStatistics {
            detail: String::new(),
        }),
    }
}

/// Checks that tensor `what` is in the layer's layout.
///
/// # Errors
/// [`Error::LayoutMismatch`].
pub(crate) fn layout(what: &str, expected: Layout, got: Layout) -> Result<()> {
    if expected != got {
        return Err(Error::LayoutMismatch {
            what: what.into(),
            expected,
            got,
        });
    }
    Ok(())
}

/// Checks that tensor `what` is stored as `expected`.
///
/// # Errors
/// [`Error::DTypeMismatch`].
pub(crate) fn dtype(what: &str, expected: DType, got: DType) -> Result<()> {
    if expected != got {
        return Err(Error::DTypeMismatch {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        });
    }
    Ok(())
}

//! BatchNorm configuration with PyTorch's defaults, and the mode of a call.
//!
//! [`BatchNormConfig::validate`] lives with the other checks in `validate.rs`.

use crate::layout::Layout;

/// Which statistics a call normalizes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Batch statistics; the running statistics are updated by the forward pass.
    Train,
    /// Running statistics (batch statistics when they are not tracked).
    Eval,
}

/// Configuration of a BatchNorm layer, with PyTorch's names and defaults.
///
/// ```
/// use wgpu_batchnorm::BatchNormConfig;
/// let cfg = BatchNormConfig::new(64).with_momentum(None).with_eps(1e-3);
/// assert!(cfg.validate().is_ok());
/// assert!(BatchNormConfig::new(64).with_eps(0.0).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormConfig {
    /// Number of channels `C`.
    pub num_features: usize,
    /// Added to the variance before the square root; finite and > 0. Default `1e-5`.
    pub eps: f64,
    /// Running-statistics factor in PyTorch's convention
    /// (`running = (1-m)*running + m*batch`), in `[0, 1]`; `None` is the cumulative
    /// average (`m = 1/num_batches_tracked`). Default `Some(0.1)`.
    pub momentum: Option<f64>,
    /// Learnable `weight` and `bias`. Default `true`.
    pub affine: bool,
    /// Keep `running_mean`, `running_var` and `num_batches_tracked`. Default `true`.
    pub track_running_stats: bool,
    /// Layout of the tensors this layer takes. Default [`Layout::ChannelsFirst`].
    pub layout: Layout,
}

impl BatchNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            layout: Layout::ChannelsFirst,
        }
    }

    /// Sets `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets `momentum` (`None` = cumulative average).
    pub fn with_momentum(mut self, momentum: Option<f64>) -> Self {
        self.momentum = momentum;
        self
    }

    /// Sets `affine`.
    pub fn with_affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }

    /// Sets `track_running_stats`.
    pub fn with_track_running_stats(mut self, track: bool) -> Self {
        self.track_running_stats = track;
        self
    }

    /// Sets the tensor layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The factor of this training step, from the counter *after* its increment.
    pub(crate) fn momentum_factor(&self, num_batches_tracked_after: u64) -> f64 {
        match self.momentum {
            Some(m) => m,
            None => 1.0 / num_batches_tracked_after.max(1) as f64,
        }
    }
}

impl Default for BatchNormConfig {
    /// PyTorch's defaults with `num_features = 1`.
    fn default() -> Self {
        Self::new(1)
    }
}

//! BatchNorm configuration with PyTorch's defaults, and tensor layouts.

use crate::error::{Error, Result};
use std::fmt;

/// Where the channel axis lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Channel on axis 1: `(N,C)`, `(N,C,L)`, `(N,C,H,W)`, `(N,C,D,H,W)` (PyTorch's default).
    #[default]
    ChannelsFirst,
    /// Channel on the last axis: `(N,L,C)`, `(N,H,W,C)`, `(N,D,H,W,C)`.
    ChannelsLast,
}

impl Layout {
    /// The fixture-format name: `NCHW` or `NHWC`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::ChannelsFirst => "NCHW",
            Layout::ChannelsLast => "NHWC",
        }
    }

    /// Parses `NCHW` / `NHWC` (also `channels_first` / `channels_last`), case-insensitively.
    pub fn parse(s: &str) -> Option<Layout> {
        match s.to_ascii_lowercase().as_str() {
            "nchw" | "channels_first" | "channels-first" | "ncl" | "ncdhw" => {
                Some(Layout::ChannelsFirst)
            }
            "nhwc" | "channels_last" | "channels-last" | "nlc" | "ndhwc" => {
                Some(Layout::ChannelsLast)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Config`] when `num_features` is 0 or exceeds `u32::MAX`, `eps` is not
    /// finite or `<= 0`, or `momentum` is not finite or lies outside `[0, 1]`.
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
        if let Some(m) = self.momentum
            && (!m.is_finite() || !(0.0..=1.0).contains(&m))
        {
            return Err(Error::Config(format!(
                "momentum must lie in [0, 1] (or be None for a cumulative average), got {m}"
            )));
        }
        Ok(())
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

/// Storage type of the big tensors (`x`, `y`, `dy`, `dx`). Parameters, running
/// and saved statistics are always f32, and every kernel accumulates in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit IEEE half float (GPU: needs `wgpu::Features::SHADER_F16`).
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// `f32` or `f16`, as the fixture format spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }

    /// Parses `f32` / `f16` (also `float32`, `float16`, `half`).
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// Rounds `v` to this storage type (f16: round to nearest even).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

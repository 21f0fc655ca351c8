//! How a tensor is stored: where its channel axis lies ([`Layout`]) and the
//! element type of the big tensors ([`DType`]).

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

/// Storage type of the big tensors (`x`, `y`, `dy`, `dx`). Parameters, running
/// and saved statistics are always f32, and every kernel accumulates in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit IEEE half float (GPU: WGSL `f16` with `wgpu::Features::SHADER_F16`, else pairs packed in `u32` words).
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

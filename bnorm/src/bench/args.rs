//! The arguments of `bnorm bench`: shapes, operations, backends, layout, dtype.

use clap::ValueEnum;
use std::path::PathBuf;
use wgpu_batchnorm::{ChannelWalk, DType, Fusion, Layout, Operation};

/// Shapes of the default run (logical `N x C x spatial`): ResNet-50's
/// BatchNorm2d inputs at batch 32, a BatchNorm1d and a small one.
pub const DEFAULT_SHAPES: &[&[usize]] = &[
    &[32, 64, 112, 112],
    &[32, 256, 56, 56],
    &[32, 512, 28, 28],
    &[32, 1024, 14, 14],
    &[32, 2048, 7, 7],
    &[4096, 1024],
    &[8, 64, 32, 32],
];

/// Shapes of `--quick`.
pub const QUICK_SHAPES: &[&[usize]] = &[&[8, 64, 32, 32], &[32, 256, 14, 14], &[1024, 256]];

/// Shapes of `--hot-path`: a small BatchNorm2d input and a tiny BatchNorm1d
/// one, where the host's share of a call is largest.
pub const HOT_PATH_SHAPES: &[&[usize]] = &[&[8, 64, 32, 32], &[32, 64]];

/// A shape given as `NxCx...` (logical order: batch, channels, spatial).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchShape(pub Vec<usize>);

impl BenchShape {
    /// `32x64x112x112`.
    pub fn name(&self) -> String {
        self.0
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x")
    }

    /// Channels `C` (the second dimension).
    pub fn channels(&self) -> usize {
        self.0[1]
    }

    /// Dims of the tensor in `layout` (`(N, *S, C)` for channels-last).
    pub fn dims(&self, layout: Layout) -> Vec<usize> {
        match layout {
            Layout::ChannelsFirst => self.0.clone(),
            Layout::ChannelsLast => {
                let mut d = vec![self.0[0]];
                d.extend_from_slice(&self.0[2..]);
                d.push(self.0[1]);
                d
            }
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.0.iter().product()
    }
}

/// Parses `NxCx...` with 2 to 5 positive dimensions (for clap).
///
/// # Errors
/// A message naming the bad part.
pub fn parse_shape(s: &str) -> Result<BenchShape, String> {
    let dims: Vec<usize> = s
        .split(['x', 'X', ','])
        .map(|p| {
            p.trim().parse::<usize>().map_err(|_| {
                format!("{p:?} in shape {s:?} is not a dimension; write e.g. 32x64x56x56")
            })
        })
        .collect::<Result<_, _>>()?;
    if !(2..=5).contains(&dims.len()) {
        return Err(format!(
            "shape {s:?} has {} dimensions; BatchNorm takes 2 to 5 (N x C x spatial)",
            dims.len()
        ));
    }
    if dims.contains(&0) {
        return Err(format!("shape {s:?} has a zero dimension"));
    }
    ChannelWalk::new(&dims, Layout::ChannelsFirst).map_err(|e| e.to_string())?;
    Ok(BenchShape(dims))
}

/// Parses `--fusion` (for clap).
///
/// # Errors
/// A message naming the choices.
pub fn parse_fusion(s: &str) -> Result<Fusion, String> {
    match Fusion::parse(s) {
        Some(f) if f != Fusion::default() => Ok(f),
        _ => Err(format!(
            "{s:?} is not a fusion; choose add_relu, add or relu"
        )),
    }
}

/// `--op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpArg {
    /// Training forward.
    Train,
    /// Evaluation forward.
    Eval,
    /// Backward.
    Backward,
    /// All three.
    All,
    /// All three fused with `--fusion` (`y = relu(BN(x) + z)` by default),
    /// each against the plain op followed by separate add and ReLU passes.
    Fused,
}

impl OpArg {
    /// The operations measured, in table order.
    pub fn operations(self) -> Vec<Operation> {
        match self {
            OpArg::Train => vec![Operation::TrainForward],
            OpArg::Eval => vec![Operation::EvalForward],
            OpArg::Backward => vec![Operation::Backward],
            OpArg::All | OpArg::Fused => Operation::ALL.to_vec(),
        }
    }
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The fast CPU backend only.
    Cpu,
    /// GPU adapters only.
    Gpu,
    /// Both.
    All,
}

/// `--layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// Channels-first (PyTorch's default).
    Nchw,
    /// Channels-last (`torch.channels_last`); rank-2 shapes stay NCHW.
    Nhwc,
}

impl From<LayoutArg> for Layout {
    fn from(arg: LayoutArg) -> Layout {
        match arg {
            LayoutArg::Nchw => Layout::ChannelsFirst,
            LayoutArg::Nhwc => Layout::ChannelsLast,
        }
    }
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// f32 storage.
    F32,
    /// f16 storage (the CPU backend, and every GPU adapter: WGSL `f16` with `SHADER_F16`, else packed words; packed words on lavapipe).
    F16,
}

impl From<DTypeArg> for DType {
    fn from(arg: DTypeArg) -> DType {
        match arg {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// How `bnorm bench` runs GPU training forwards (`--single-pass`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinglePassArg {
    /// The library's choice.
    Auto,
    /// One pass wherever it applies.
    On,
    /// Always the passes.
    Off,
}

impl From<SinglePassArg> for Option<bool> {
    fn from(a: SinglePassArg) -> Self {
        match a {
            SinglePassArg::Auto => None,
            SinglePassArg::On => Some(true),
            SinglePassArg::Off => Some(false),
        }
    }
}

/// Arguments of `bnorm bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A shape N x C x spatial, e.g. 32x256x56x56 (repeatable). Default: ResNet-50's
    /// BatchNorm inputs at batch 32, 4096x1024 (BatchNorm1d) and 8x64x32x32.
    #[arg(long = "shape", value_name = "NxCx...", value_parser = parse_shape)]
    pub shapes: Vec<BenchShape>,
    /// Which operation(s) (throughput runs; `--hot-path` measures training
    /// forward and backward).
    #[arg(long, value_enum, default_value = "all")]
    pub op: OpArg,
    /// With `--op fused`: what follows the BatchNorm, `add_relu` (the
    /// residual add, then ReLU), `add` or `relu`.
    #[arg(long, value_name = "FUSION", default_value = "add_relu", value_parser = parse_fusion)]
    pub fusion: Fusion,
    /// The CPU backend, GPU adapters, or both (`--hot-path`: GPU adapters only).
    #[arg(long, value_enum, default_value = "all")]
    pub backend: BackendArg,
    /// Only adapters whose `backend:name` contains NAME (case-insensitive), e.g.
    /// `vulkan`, `llvmpipe`, `gl:`. WGPU_BACKEND and WGPU_ADAPTER_NAME also narrow.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Tensor layout.
    #[arg(long, value_enum, default_value = "nchw")]
    pub layout: LayoutArg,
    /// Storage type of x, y, dy, dx.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// GPU training forwards in one pass that reads `x` once (`on`), in
    /// passes (`off`), or as the library chooses (`auto`: one pass on CPU
    /// adapters where the channels are small enough; `GpuBatchNorm::set_single_pass`).
    #[arg(long, value_enum, default_value = "auto")]
    pub single_pass: SinglePassArg,
    /// Timed runs per measurement (the median is reported). Default 20, 3 with
    /// --quick; with --hot-path 3 of the layer runs, and 20 times as many of
    /// the floor and of the recording, which take microseconds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: Option<u32>,
    /// Untimed runs before them. Default 3, 1 with --quick, 0 with --hot-path
    /// (where each layer's first call comes before the timed runs anyway).
    #[arg(long, value_name = "N")]
    pub warmup: Option<u32>,
    /// Small shapes (8x64x32x32, 32x256x14x14, 1024x256) and few repeats: a couple
    /// of minutes even on a software adapter.
    #[arg(long)]
    pub quick: bool,
    /// Measure the host cost of the GPU layer's hot path instead of throughput,
    /// on every adapter (not the CPU backend) and shape (default 8x64x32x32
    /// and 32x64), in host wall time: the floor (one empty submit and wait,
    /// raw and through `GpuContext::run`); recording one training forward +
    /// backward into an encoder after the layer's first call, without and with
    /// `encoder.finish()`, and the buffers and bind groups the layer creates
    /// meanwhile; and `--layers` layers' training forwards recorded into one
    /// submission (whole, and by phase: recording, finish, submit, wait)
    /// against as many blocking calls (one submit and wait each).
    #[arg(long, conflicts_with_all = ["op", "svg"])]
    pub hot_path: bool,
    /// Layers of the --hot-path comparison, each with its own input, output
    /// and saved statistics.
    #[arg(long, value_name = "N", default_value_t = 50, requires = "hot_path",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub layers: u32,
    /// Write one JSON record per measurement to FILE (an array; with
    /// --hot-path an object whose `hot_path` holds them).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart (GB/s per shape, CPU vs GPU, copy rooflines) to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

impl BenchArgs {
    /// The shapes given, or the default (or `--quick`, or `--hot-path`) set.
    pub fn shapes(&self) -> Vec<BenchShape> {
        if !self.shapes.is_empty() {
            return self.shapes.clone();
        }
        let set = if self.hot_path {
            HOT_PATH_SHAPES
        } else if self.quick {
            QUICK_SHAPES
        } else {
            DEFAULT_SHAPES
        };
        set.iter().map(|s| BenchShape(s.to_vec())).collect()
    }

    /// Timed runs per measurement.
    pub fn repeat(&self) -> u32 {
        let default = match (self.hot_path, self.quick) {
            (true, _) | (false, true) => 3,
            (false, false) => 20,
        };
        self.repeat.unwrap_or(default)
    }

    /// Untimed runs before them.
    pub fn warmup(&self) -> u32 {
        let default = match (self.hot_path, self.quick) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 3,
        };
        self.warmup.unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_shape("32x64x112x112").unwrap().0,
            vec![32, 64, 112, 112]
        );
        assert_eq!(parse_shape("4096X1024").unwrap().name(), "4096x1024");
        assert!(parse_shape("32").unwrap_err().contains("2 to 5"));
        assert!(parse_shape("1x2x3x4x5x6").unwrap_err().contains("2 to 5"));
        assert!(parse_shape("8x0x4").unwrap_err().contains("zero"));
        assert!(parse_shape("8xax4").unwrap_err().contains("\"a\""));
        assert!(parse_shape("65536x65536x2").is_err(), "past u32 elements");
    }

    #[test]
    fn channels_last_dims_move_c_to_the_end() {
        let s = BenchShape(vec![2, 3, 4, 5]);
        assert_eq!(s.dims(Layout::ChannelsLast), vec![2, 4, 5, 3]);
        assert_eq!(s.dims(Layout::ChannelsFirst), vec![2, 3, 4, 5]);
        assert_eq!(s.channels(), 3);
    }
}

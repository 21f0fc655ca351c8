//! `bnorm bench`: CPU vs GPU throughput of BatchNorm, against a copy kernel
//! measured on the same device in the same run.
//!
//! For each operation (training forward, evaluation forward, backward) and
//! shape, on the fast CPU backend ([`CpuBatchNorm`]) and on every GPU adapter:
//!
//! - the median time over `--repeat` runs after `--warmup` runs;
//! - GB/s of the ideal traffic per element ([`Op::bytes_per_element`]:
//!   f32 train forward 12 B, eval 8 B, backward 20 B; f16 storage half);
//! - that figure as a fraction of a copy measured on the same device in the
//!   same run (GPU: the vec4 kernel of [`GpuContext::copy`]; CPU:
//!   [`crate::cpu::parallel_copy`]; 8 B per element);
//! - on GPUs, the time both from timestamp queries (GPU time of the passes,
//!   where the adapter has `TIMESTAMP_QUERY`) and from the wall clock around
//!   submit-and-wait, each in its own record (`gpu_time_source`), each
//!   against a copy timed the same way; and the GPU/CPU ratio (CPU time over
//!   GPU time for the same op, shape, layout and dtype).
//!
//! Results: a table on stdout, `--json FILE` (one record per measurement,
//! [`Record`]), `--svg FILE` (GB/s per shape, CPU vs GPU, copy rooflines
//! dashed). Progress goes to stderr.

use crate::config::{BatchNormConfig, Mode};
use crate::cpu::{CpuBatchNorm, parallel_copy};
use crate::error::{Error, Result};
use crate::gpu::{AdapterSelection, GpuBatchNorm, GpuContext, GpuTensor, enumerate_adapters};
use crate::layout::{DType, Layout};
use crate::shape::ChannelWalk;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

    /// Whether the shape has no elements (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses `NxCx...` with 2 to 5 positive dimensions (for clap).
///
/// # Errors
/// A message naming the bad part.
pub fn parse_shape(s: &str) -> std::result::Result<BenchShape, String> {
    let dims: Vec<usize> = s
        .split(['x', 'X', ','])
        .map(|p| {
            p.trim().parse::<usize>().map_err(|_| {
                format!("{p:?} in shape {s:?} is not a dimension; write e.g. 32x64x56x56")
            })
        })
        .collect::<std::result::Result<_, _>>()?;
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

/// An operation `bnorm bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Op {
    /// Training forward (batch statistics, running-statistics update).
    Train,
    /// Evaluation forward (running statistics).
    Eval,
    /// Backward of a training forward (`dx`, `dweight`, `dbias`).
    Backward,
}

impl Op {
    /// Every operation, in table order.
    pub const ALL: [Op; 3] = [Op::Train, Op::Eval, Op::Backward];

    /// The record name: `train_forward`, `eval_forward`, `backward`
    /// (as `scripts/torch_bench.py` names them).
    pub fn name(self) -> &'static str {
        match self {
            Op::Train => "train_forward",
            Op::Eval => "eval_forward",
            Op::Backward => "backward",
        }
    }

    /// Ideal traffic per element in bytes: f32 train forward 12 (read `x`
    /// twice, write `y`), eval 8, backward 20 (read `x`, `dy` twice, write
    /// `dx`); half of that for f16 storage. Per-channel tensors are not counted.
    pub fn bytes_per_element(self, dtype: DType) -> f64 {
        let f32_bytes = match self {
            Op::Train => 12.0,
            Op::Eval => 8.0,
            Op::Backward => 20.0,
        };
        f32_bytes * dtype.size() as f64 / 4.0
    }
}

/// Copy traffic per element: read and write, 8 B for f32.
fn copy_bytes_per_element(dtype: DType) -> f64 {
    2.0 * dtype.size() as f64
}

/// `--op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OpArg {
    /// Training forward.
    Train,
    /// Evaluation forward.
    Eval,
    /// Backward.
    Backward,
    /// All three.
    All,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// The fast CPU backend only.
    Cpu,
    /// GPU adapters only.
    Gpu,
    /// Both.
    All,
}

/// `--layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutArg {
    /// Channels-first (PyTorch's default).
    Nchw,
    /// Channels-last (`torch.channels_last`); rank-2 shapes stay NCHW.
    Nhwc,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    /// f32 storage.
    F32,
    /// f16 storage (GPU adapters with `SHADER_F16`; the CPU backend is f32-only).
    F16,
}

/// Arguments of `bnorm bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A shape N x C x spatial, e.g. 32x256x56x56 (repeatable). Default: ResNet-50's
    /// BatchNorm inputs at batch 32, 4096x1024 (BatchNorm1d) and 8x64x32x32.
    #[arg(long = "shape", value_name = "NxCx...", value_parser = parse_shape)]
    pub shapes: Vec<BenchShape>,
    /// Which operation(s).
    #[arg(long, value_enum, default_value = "all")]
    pub op: OpArg,
    /// The CPU backend, GPU adapters, or both.
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
    /// Timed runs per measurement (the median is reported). Default 20, 3 with --quick.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: Option<u32>,
    /// Untimed runs before them. Default 3, 1 with --quick.
    #[arg(long, value_name = "N")]
    pub warmup: Option<u32>,
    /// Small shapes (8x64x32x32, 32x256x14x14, 1024x256) and few repeats: a couple
    /// of minutes even on a software adapter.
    #[arg(long)]
    pub quick: bool,
    /// Write one JSON record per measurement to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart (GB/s per shape, CPU vs GPU, copy rooflines) to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

/// One measurement, as `--json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// `train_forward`, `eval_forward` or `backward`.
    pub op: &'static str,
    /// `cpu`, or the adapter's backend (`vulkan`, `gl`, `metal`, `dx12`).
    pub backend: String,
    /// CPU model and threads, or the adapter name.
    pub device: String,
    /// Logical shape `NxCx...`.
    pub shape: String,
    /// `NCHW` or `NHWC`.
    pub layout: &'static str,
    /// `f32` or `f16`.
    pub dtype: &'static str,
    /// Elements of the tensor.
    pub elements: usize,
    /// Timed runs.
    pub repeat: u32,
    /// Median seconds of one operation.
    pub median_s: f64,
    /// GB/s (1e9 bytes/s) of the ideal traffic.
    pub gbps: f64,
    /// GB/s of the copy on the same device, timed the same way.
    pub copy_gbps: f64,
    /// `gbps / copy_gbps`.
    pub fraction_of_copy: f64,
    /// GPU records: `timestamp` (GPU time between timestamp queries around the
    /// passes) or `wall` (host clock around submit and wait).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_time_source: Option<&'static str>,
    /// GPU records: CPU time over GPU time for the same op, shape, layout and dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_over_cpu: Option<f64>,
}

/// A measurement that did not run, and why.
#[derive(Debug)]
struct Skip {
    what: String,
    error: Error,
}

impl Skip {
    /// An unsupported feature (f16 on the CPU, no timestamps) is a note, not a failure.
    fn is_failure(&self) -> bool {
        !matches!(self.error, Error::Unsupported { .. })
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
struct Run {
    records: Vec<Record>,
    skips: Vec<Skip>,
    notes: Vec<String>,
}

/// Median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Median wall-clock seconds of `f` over `repeat` runs after `warmup`.
fn time_wall(warmup: u32, repeat: u32, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(repeat as usize);
    for _ in 0..repeat {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// Median GPU seconds of `f` (one submit each) from timestamp queries.
fn time_gpu(
    ctx: &GpuContext,
    warmup: u32,
    repeat: u32,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    ctx.set_timestamps(true)?;
    let mut run = || -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let mut t = Vec::with_capacity(repeat as usize);
        for _ in 0..repeat {
            f()?;
            let d = ctx.last_gpu_time().ok_or_else(|| Error::Unsupported {
                adapter: ctx.name().to_string(),
                what: "usable timestamps (the queries came back empty or out of order)".into(),
            })?;
            t.push(d.as_secs_f64());
        }
        Ok(median(t))
    };
    let result = run();
    ctx.set_timestamps(false)?;
    result
}

/// Deterministic pseudo-random data in [-2, 2) (xorshift), never zeros everywhere.
fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// CPU model (from /proc/cpuinfo where there is one) and rayon's thread count.
fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model} ({} threads)", rayon::current_num_threads())
}

/// What one measurement is about.
struct Case<'a> {
    shape: &'a BenchShape,
    layout: Layout,
    dtype: DType,
    repeat: u32,
    warmup: u32,
}

impl Case<'_> {
    fn record(
        &self,
        op: &'static str,
        backend: &str,
        device: &str,
        seconds: f64,
        bytes_per_element: f64,
    ) -> Record {
        let n = self.shape.len();
        Record {
            op,
            backend: backend.to_string(),
            device: device.to_string(),
            shape: self.shape.name(),
            layout: self.layout.name(),
            dtype: self.dtype.name(),
            elements: n,
            repeat: self.repeat,
            median_s: seconds,
            gbps: n as f64 * bytes_per_element / seconds / 1e9,
            copy_gbps: f64::NAN,
            fraction_of_copy: f64::NAN,
            gpu_time_source: None,
            gpu_over_cpu: None,
        }
    }
}

/// Measures the CPU backend on one shape.
fn bench_cpu(case: &Case<'_>, ops: &[Op], run: &mut Run, pb: &ProgressBar) {
    let device = cpu_name();
    let what = format!("cpu {} {}", case.shape.name(), case.layout);
    if case.dtype != DType::F32 {
        run.skips.push(Skip {
            what,
            error: Error::Unsupported {
                adapter: "cpu".into(),
                what: format!(
                    "{} storage: the CPU backend computes in f32 (measure it with --dtype f32)",
                    case.dtype
                ),
            },
        });
        pb.inc(ops.len() as u64 + 1);
        return;
    }
    let dims = case.shape.dims(case.layout);
    let n = case.shape.len();
    let c = case.shape.channels();
    let x = data(n, 1);
    let dy = data(n, 2);
    let mut y = vec![0.0f32; n];
    let mut dx = vec![0.0f32; n];
    let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);

    pb.set_message(format!("cpu copy {}", case.shape.name()));
    let copy = time_wall(case.warmup, case.repeat, || parallel_copy(&x, &mut y));
    pb.inc(1);
    let copy_gbps = match copy {
        Ok(t) => n as f64 * copy_bytes_per_element(case.dtype) / t / 1e9,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(ops.len() as u64);
            return;
        }
    };
    let mut bn = match CpuBatchNorm::new(BatchNormConfig::new(c).with_layout(case.layout)) {
        Ok(bn) => bn,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(ops.len() as u64);
            return;
        }
    };
    for &op in ops {
        pb.set_message(format!("cpu {} {}", op.name(), case.shape.name()));
        let t = match op {
            Op::Train => time_wall(case.warmup, case.repeat, || {
                bn.forward_train_slice(&x, &dims, &mut y)
            }),
            Op::Eval => time_wall(case.warmup, case.repeat, || {
                bn.forward_eval_slice(&x, &dims, &mut y)
            }),
            Op::Backward => bn.forward_train_slice(&x, &dims, &mut y).and_then(|()| {
                time_wall(case.warmup, case.repeat, || {
                    bn.backward_slice(&x, &dy, &dims, Mode::Train, &mut dx, &mut dw, &mut db)
                })
            }),
        };
        pb.inc(1);
        match t {
            Ok(t) => {
                let mut r = case.record(
                    op.name(),
                    "cpu",
                    &device,
                    t,
                    op.bytes_per_element(case.dtype),
                );
                r.copy_gbps = copy_gbps;
                r.fraction_of_copy = r.gbps / copy_gbps;
                run.records.push(r);
            }
            Err(error) => run.skips.push(Skip {
                what: format!("cpu {} {} {}", op.name(), case.shape.name(), case.layout),
                error,
            }),
        }
    }
}

/// The GPU tensors of one shape.
struct GpuData {
    x: GpuTensor,
    dy: GpuTensor,
    y: GpuTensor,
    dx: GpuTensor,
    dw: GpuTensor,
    db: GpuTensor,
}

impl GpuData {
    fn new(ctx: &GpuContext, case: &Case<'_>) -> Result<Self> {
        let dims = case.shape.dims(case.layout);
        let n = case.shape.len();
        let c = [case.shape.channels()];
        Ok(Self {
            x: GpuTensor::from_slice_as(ctx, &data(n, 1), &dims, case.layout, case.dtype)?,
            dy: GpuTensor::from_slice_as(ctx, &data(n, 2), &dims, case.layout, case.dtype)?,
            y: GpuTensor::uninit_as(ctx, &dims, case.layout, case.dtype)?,
            dx: GpuTensor::uninit_as(ctx, &dims, case.layout, case.dtype)?,
            dw: GpuTensor::uninit(ctx, &c, case.layout)?,
            db: GpuTensor::uninit(ctx, &c, case.layout)?,
        })
    }
}

/// Times `f` on `ctx` by each available source: `(source, seconds or error)`.
fn time_sources(
    ctx: &GpuContext,
    case: &Case<'_>,
    mut f: impl FnMut() -> Result<()>,
) -> Vec<(&'static str, Result<f64>)> {
    let mut out = Vec::new();
    if ctx.has_timestamps() {
        out.push(("timestamp", time_gpu(ctx, case.warmup, case.repeat, &mut f)));
    }
    out.push(("wall", time_wall(case.warmup, case.repeat, &mut f)));
    out
}

/// Measures one adapter on one shape.
fn bench_gpu(ctx: &GpuContext, case: &Case<'_>, ops: &[Op], run: &mut Run, pb: &ProgressBar) {
    let backend = ctx.adapter_info().backend.to_string();
    let device = ctx.name().to_string();
    let what = format!("{} {} {}", ctx.label(), case.shape.name(), case.layout);
    let setup = GpuData::new(ctx, case).and_then(|d| {
        let cfg = BatchNormConfig::new(case.shape.channels()).with_layout(case.layout);
        Ok((d, GpuBatchNorm::new(ctx, cfg)?))
    });
    let (d, mut bn) = match setup {
        Ok(s) => s,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(ops.len() as u64 + 1);
            return;
        }
    };
    pb.set_message(format!("{} copy {}", ctx.label(), case.shape.name()));
    let n = case.shape.len() as f64;
    let mut copy_gbps = Vec::new();
    for (source, t) in time_sources(ctx, case, || ctx.copy(&d.x, &d.y)) {
        match t {
            Ok(t) => copy_gbps.push((source, n * copy_bytes_per_element(case.dtype) / t / 1e9)),
            Err(error) => run.skips.push(Skip {
                what: format!("{what} copy ({source} time)"),
                error,
            }),
        }
    }
    pb.inc(1);
    for &op in ops {
        pb.set_message(format!(
            "{} {} {}",
            ctx.label(),
            op.name(),
            case.shape.name()
        ));
        let times = match op {
            Op::Train => time_sources(ctx, case, || bn.forward_train_into(&d.x, &d.y)),
            Op::Eval => time_sources(ctx, case, || bn.forward_eval_into(&d.x, &d.y)),
            Op::Backward => match bn.forward_train_into(&d.x, &d.y) {
                Ok(()) => time_sources(ctx, case, || {
                    bn.backward_into(&d.x, &d.dy, Mode::Train, &d.dx, &d.dw, &d.db)
                }),
                Err(e) => vec![("wall", Err(e))],
            },
        };
        pb.inc(1);
        for (source, t) in times {
            let copy = copy_gbps
                .iter()
                .find(|(s, _)| *s == source)
                .map(|&(_, g)| g);
            match t {
                Ok(t) => {
                    let mut r = case.record(
                        op.name(),
                        &backend,
                        &device,
                        t,
                        op.bytes_per_element(case.dtype),
                    );
                    r.gpu_time_source = Some(source);
                    r.copy_gbps = copy.unwrap_or(f64::NAN);
                    r.fraction_of_copy = r.gbps / r.copy_gbps;
                    run.records.push(r);
                }
                Err(error) => run.skips.push(Skip {
                    what: format!("{what} {} ({source} time)", op.name()),
                    error,
                }),
            }
        }
    }
}

/// Opens the adapters `args` asks for; notes the ones that cannot run.
fn open_adapters(args: &BenchArgs, run: &mut Run) -> Vec<GpuContext> {
    let filter = args.adapter.as_ref().map(|a| a.to_lowercase());
    let mut out = Vec::new();
    for adapter in enumerate_adapters(&AdapterSelection::from_env()) {
        let info = adapter.get_info();
        let label = format!("{}:{}", info.backend, info.name);
        if filter
            .as_ref()
            .is_some_and(|f| !label.to_lowercase().contains(f))
        {
            continue;
        }
        match GpuContext::from_adapter(&adapter) {
            Ok(ctx) => out.push(ctx),
            Err(error) => run.skips.push(Skip {
                what: format!("{label} (all measurements)"),
                error,
            }),
        }
    }
    out
}

/// Fills `gpu_over_cpu` of GPU records from the CPU record of the same case.
fn fill_ratios(records: &mut [Record]) {
    let cpu: Vec<Record> = records
        .iter()
        .filter(|r| r.gpu_time_source.is_none())
        .cloned()
        .collect();
    for r in records.iter_mut().filter(|r| r.gpu_time_source.is_some()) {
        r.gpu_over_cpu = cpu
            .iter()
            .find(|c| {
                c.op == r.op && c.shape == r.shape && c.layout == r.layout && c.dtype == r.dtype
            })
            .map(|c| c.median_s / r.median_s);
    }
}

/// Seconds with a unit.
fn human_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// The table printed on screen.
pub fn table(records: &[Record]) -> String {
    let head = [
        "op",
        "shape",
        "layout",
        "dtype",
        "backend",
        "device",
        "time from",
        "median",
        "GB/s",
        "copy GB/s",
        "of copy",
        "GPU/CPU",
    ];
    let rows: Vec<[String; 12]> = records
        .iter()
        .map(|r| {
            [
                r.op.to_string(),
                r.shape.clone(),
                r.layout.to_string(),
                r.dtype.to_string(),
                r.backend.clone(),
                r.device.clone(),
                r.gpu_time_source.unwrap_or("wall").to_string(),
                human_time(r.median_s),
                format!("{:.2}", r.gbps),
                format!("{:.2}", r.copy_gbps),
                format!("{:.0}%", r.fraction_of_copy * 100.0),
                r.gpu_over_cpu.map_or("-".into(), |g| format!("{g:.2}x")),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            w[i] = w[i].max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < 7 {
                let _ = write!(s, "{cell:<width$}", width = w[i]);
            } else {
                let _ = write!(s, "{cell:>width$}", width = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&head);
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1)));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out
}

/// Writes `text` to `path`.
fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::Output {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The records as a pretty-printed JSON array.
///
/// # Errors
/// [`Error::Output`] when serialization fails.
pub fn to_json(records: &[Record]) -> Result<String> {
    serde_json::to_string_pretty(records)
        .map(|s| s + "\n")
        .map_err(|e| Error::Output {
            path: "(json)".into(),
            message: e.to_string(),
        })
}

/// A GB/s axis label without trailing zeros: `100`, `2.5`, `0.01`.
fn gbps_label(v: f64) -> String {
    let s = if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Draws GB/s per shape, one panel per op: a line per device (GPU time from
/// timestamps where measured, else wall clock) and its copy roofline dashed
/// in the same colour; log scale.
///
/// # Errors
/// [`Error::Output`] when drawing or writing fails or there is nothing to draw.
pub fn write_svg(path: &Path, records: &[Record], title: &str) -> Result<()> {
    use plotters::prelude::*;
    let out_err = |message: String| Error::Output {
        path: path.display().to_string(),
        message,
    };
    // Keep, per device and case, the preferred time source.
    let preferred = |r: &Record| match r.gpu_time_source {
        None => true,
        Some("timestamp") => true,
        Some(_) => !records.iter().any(|o| {
            o.gpu_time_source == Some("timestamp")
                && o.device == r.device
                && o.backend == r.backend
                && o.op == r.op
                && o.shape == r.shape
        }),
    };
    let chosen: Vec<&Record> = records
        .iter()
        .filter(|r| preferred(r) && r.gbps.is_finite())
        .collect();
    if chosen.is_empty() {
        return Err(out_err("no measurement to draw".into()));
    }
    let mut shapes: Vec<String> = Vec::new();
    let mut ops: Vec<&'static str> = Vec::new();
    let mut series: Vec<(String, String)> = Vec::new(); // (backend, device)
    for r in &chosen {
        if !shapes.contains(&r.shape) {
            shapes.push(r.shape.clone());
        }
        if !ops.contains(&r.op) {
            ops.push(r.op);
        }
        let key = (r.backend.clone(), r.device.clone());
        if !series.contains(&key) {
            series.push(key);
        }
    }
    let values = chosen
        .iter()
        .flat_map(|r| [r.gbps, r.copy_gbps])
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    // Room above the lines for the legend (log scale: a decade and a half).
    let (lo, hi) = (lo / 2.0, hi * 30.0);
    let panel_h = 340u32;
    let root = SVGBackend::new(path, (1000, 60 + panel_h * ops.len() as u32)).into_drawing_area();
    let e = |x: &dyn std::fmt::Display| out_err(x.to_string());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, body) = root.split_vertically(60);
    top.titled(title, ("sans-serif", 18)).map_err(|x| e(&x))?;
    let panels = body.split_evenly((ops.len(), 1));
    let n = shapes.len() as i32;
    let label_of = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            shapes.get(*i as usize).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    for (panel, op) in panels.iter().zip(&ops) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{op}: GB/s of ideal traffic (dashed: copy on the same device)"),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d((0..(n - 1).max(1)).into_segmented(), (lo..hi).log_scale())
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_labels(shapes.len())
            .x_label_formatter(&label_of)
            .y_desc("GB/s")
            .y_label_formatter(&|v| gbps_label(*v))
            .draw()
            .map_err(|x| e(&x))?;
        for (k, (backend, device)) in series.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let pts: Vec<(i32, f64, f64)> = chosen
                .iter()
                .filter(|r| r.op == *op && &r.backend == backend && &r.device == device)
                .filter_map(|r| {
                    shapes
                        .iter()
                        .position(|s| *s == r.shape)
                        .map(|i| (i as i32, r.gbps, r.copy_gbps))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let source = chosen
                .iter()
                .find(|r| &r.backend == backend && &r.device == device)
                .and_then(|r| r.gpu_time_source)
                .map_or(String::new(), |s| format!(", {s} time"));
            let label = format!("{backend}: {device}{source}");
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|&(i, g, _)| (SegmentValue::CenterOf(i), g)),
                    color.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&(i, g, _)| {
                    Circle::new((SegmentValue::CenterOf(i), g), 3, color.filled())
                }))
                .map_err(|x| e(&x))?;
            let roof: Vec<(SegmentValue<i32>, f64)> = pts
                .iter()
                .filter(|p| p.2.is_finite())
                .map(|&(i, _, c)| (SegmentValue::CenterOf(i), c))
                .collect();
            chart
                .draw_series(DashedLineSeries::new(roof, 6, 4, color.stroke_width(1)))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Runs `bnorm bench` and returns its exit status: 0 when every measurement
/// ran (unsupported combinations, e.g. f16 on the CPU, are noted but not
/// failures), 1 when one failed or nothing could be measured, 2 for usage errors.
///
/// # Errors
/// [`Error::Output`] when `--json` or `--svg` cannot be written.
pub fn run_cli(args: &BenchArgs) -> Result<i32> {
    let shapes: Vec<BenchShape> = if args.shapes.is_empty() {
        let set = if args.quick {
            QUICK_SHAPES
        } else {
            DEFAULT_SHAPES
        };
        set.iter().map(|s| BenchShape(s.to_vec())).collect()
    } else {
        args.shapes.clone()
    };
    let repeat = args.repeat.unwrap_or(if args.quick { 3 } else { 20 });
    let warmup = args.warmup.unwrap_or(if args.quick { 1 } else { 3 });
    let ops: Vec<Op> = match args.op {
        OpArg::Train => vec![Op::Train],
        OpArg::Eval => vec![Op::Eval],
        OpArg::Backward => vec![Op::Backward],
        OpArg::All => Op::ALL.to_vec(),
    };
    let dtype = match args.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
    };
    let want_layout = match args.layout {
        LayoutArg::Nchw => Layout::ChannelsFirst,
        LayoutArg::Nhwc => Layout::ChannelsLast,
    };
    let mut run = Run::default();
    let cpu = args.backend != BackendArg::Gpu;
    let gpus = if args.backend == BackendArg::Cpu {
        Vec::new()
    } else {
        eprintln!("opening GPU adapters...");
        let g = open_adapters(args, &mut run);
        if g.is_empty() {
            run.notes.push(match &args.adapter {
                Some(a) => format!("no GPU adapter matches --adapter {a:?}"),
                None => "no GPU adapter found (see `bnorm adapters`)".into(),
            });
        }
        g
    };
    let backends = usize::from(cpu) + gpus.len();
    let steps = (shapes.len() * backends * (ops.len() + 1)) as u64;
    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for shape in &shapes {
        let layout = if want_layout == Layout::ChannelsLast && shape.0.len() < 3 {
            run.notes.push(format!(
                "{} has no channels-last form (rank 2); measured as NCHW",
                shape.name()
            ));
            Layout::ChannelsFirst
        } else {
            want_layout
        };
        let case = Case {
            shape,
            layout,
            dtype,
            repeat,
            warmup,
        };
        if cpu {
            bench_cpu(&case, &ops, &mut run, &pb);
        }
        for ctx in &gpus {
            bench_gpu(ctx, &case, &ops, &mut run, &pb);
        }
    }
    pb.finish_and_clear();
    fill_ratios(&mut run.records);

    println!(
        "bnorm bench: median of {repeat} runs after {warmup} warm-up; GB/s of ideal traffic \
         (per element, f32: train 12 B, eval 8 B, backward 20 B; f16 half); \"of copy\": against a copy \
         on the same device in this run, timed the same way (GPU: vec4 kernel, CPU: all threads; 8 B per \
         f32 element); GPU/CPU: CPU time / GPU time. GPU \"time from\": timestamp = GPU time between \
         timestamp queries, wall = host clock around submit and wait.\n"
    );
    print!("{}", table(&run.records));
    for note in &run.notes {
        println!("note: {note}");
    }
    for s in &run.skips {
        let kind = if s.is_failure() {
            "FAILED"
        } else {
            "not measured"
        };
        println!("{kind}: {}: {}", s.what, s.error);
    }
    if let Some(path) = &args.json {
        write_file(path, &to_json(&run.records)?)?;
        eprintln!("wrote {} records to {}", run.records.len(), path.display());
    }
    if let Some(path) = &args.svg {
        if run.records.is_empty() {
            eprintln!("no chart: nothing was measured");
        } else {
            let title = format!(
                "bnorm bench, {} {}: GB/s per shape (median of {repeat})",
                want_layout.name(),
                dtype.name()
            );
            write_svg(path, &run.records, &title)?;
            eprintln!("wrote the chart to {}", path.display());
        }
    }
    let failed = run.skips.iter().any(Skip::is_failure);
    Ok(if failed || run.records.is_empty() {
        1
    } else {
        0
    })
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

    #[test]
    fn traffic_per_element() {
        assert_eq!(Op::Train.bytes_per_element(DType::F32), 12.0);
        assert_eq!(Op::Eval.bytes_per_element(DType::F32), 8.0);
        assert_eq!(Op::Backward.bytes_per_element(DType::F32), 20.0);
        assert_eq!(Op::Backward.bytes_per_element(DType::F16), 10.0);
        assert_eq!(copy_bytes_per_element(DType::F32), 8.0);
    }

    #[test]
    fn axis_labels_drop_trailing_zeros() {
        assert_eq!(gbps_label(100.0), "100");
        assert_eq!(gbps_label(2.5), "2.5");
        assert_eq!(gbps_label(0.01), "0.01");
        assert_eq!(gbps_label(1.0), "1");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    fn rec(op: &'static str, backend: &str, source: Option<&'static str>, median_s: f64) -> Record {
        Record {
            op,
            backend: backend.into(),
            device: "d".into(),
            shape: "8x64x32x32".into(),
            layout: "NCHW",
            dtype: "f32",
            elements: 8 * 64 * 32 * 32,
            repeat: 3,
            median_s,
            gbps: 1.0,
            copy_gbps: 2.0,
            fraction_of_copy: 0.5,
            gpu_time_source: source,
            gpu_over_cpu: None,
        }
    }

    #[test]
    fn ratios_pair_gpu_records_with_the_cpu_record_of_the_same_case() {
        let mut r = vec![
            rec("train_forward", "cpu", None, 4.0),
            rec("train_forward", "vulkan", Some("timestamp"), 1.0),
            rec("backward", "vulkan", Some("wall"), 2.0),
        ];
        fill_ratios(&mut r);
        assert_eq!(r[0].gpu_over_cpu, None);
        assert_eq!(r[1].gpu_over_cpu, Some(4.0));
        assert_eq!(r[2].gpu_over_cpu, None, "no CPU backward measured");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let mut r = vec![
            rec("eval_forward", "cpu", None, 1.0),
            rec("eval_forward", "gl", Some("wall"), 0.5),
        ];
        fill_ratios(&mut r);
        let v: serde_json::Value = serde_json::from_str(&to_json(&r).unwrap()).unwrap();
        let cpu = &v[0];
        for k in [
            "op",
            "backend",
            "device",
            "shape",
            "layout",
            "dtype",
            "median_s",
            "gbps",
            "copy_gbps",
            "fraction_of_copy",
        ] {
            assert!(cpu.get(k).is_some(), "missing {k}");
        }
        assert!(cpu.get("gpu_time_source").is_none());
        assert_eq!(v[1]["gpu_time_source"], "wall");
        assert_eq!(v[1]["gpu_over_cpu"], 2.0);
    }

    #[test]
    fn table_names_every_column_and_time_source() {
        let t = table(&[rec("backward", "vulkan", Some("timestamp"), 1.5e-3)]);
        let mut lines = t.lines();
        let head = lines.next().unwrap();
        for col in [
            "op",
            "shape",
            "backend",
            "time from",
            "GB/s",
            "copy GB/s",
            "of copy",
            "GPU/CPU",
        ] {
            assert!(head.contains(col), "{head}");
        }
        let row = lines.nth(1).unwrap();
        assert!(
            row.contains("timestamp") && row.contains("1.500 ms") && row.contains("50%"),
            "{row}"
        );
    }

    #[test]
    fn svg_chart_is_written() {
        let dir = std::env::temp_dir().join(format!("bnorm-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.svg");
        let mut r = vec![
            rec("train_forward", "cpu", None, 4.0),
            rec("train_forward", "vulkan", Some("timestamp"), 1.0),
        ];
        r[1].gbps = 4.0;
        write_svg(&path, &r, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("8x64x32x32")
                && svg.contains("vulkan: d, timestamp time")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(write_svg(&dir.join("missing-dir/x.svg"), &r, "t").is_err());
    }
}

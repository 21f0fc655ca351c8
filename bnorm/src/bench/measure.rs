//! Timing the operations on the fast CPU backend and on a GPU adapter, each
//! against a copy on the same device.

use super::args::BenchShape;
use super::record::Record;
use half::f16;
use indicatif::ProgressBar;
use std::time::Instant;
use wgpu_batchnorm::cpu::{CpuElement, parallel_copy};
use wgpu_batchnorm::{
    BatchNormConfig, CpuBatchNorm, DType, Error, GpuBatchNorm, GpuContext, GpuSavedStats,
    GpuTensor, Layout, Mode, Operation, Result,
};

/// Copy traffic per element: read and write, 8 B for f32, 4 B for f16.
pub fn copy_bytes_per_element(dtype: DType) -> f64 {
    2.0 * dtype.size() as f64
}

/// A measurement that did not run, and why.
#[derive(Debug)]
pub struct Skip {
    /// What was to be measured.
    pub what: String,
    /// Why it was not.
    pub error: Error,
}

impl Skip {
    /// An unsupported feature (f16 on an adapter without it, no timestamps) is a note, not a failure.
    pub fn is_failure(&self) -> bool {
        !matches!(self.error, Error::Unsupported { .. })
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Run {
    /// One per measurement.
    pub records: Vec<Record>,
    /// Measurements that did not run.
    pub skips: Vec<Skip>,
    /// Remarks for the end of the table.
    pub notes: Vec<String>,
}

/// Median of `v` (not empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Median wall-clock seconds of `f` over `repeat` runs after `warmup`.
pub fn time_wall(warmup: u32, repeat: u32, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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
pub fn data(len: usize, seed: u64) -> Vec<f32> {
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
pub fn cpu_name() -> String {
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
pub struct Case<'a> {
    /// Logical shape.
    pub shape: &'a BenchShape,
    /// Layout of the tensors.
    pub layout: Layout,
    /// Storage type of the tensors.
    pub dtype: DType,
    /// Timed runs.
    pub repeat: u32,
    /// Untimed runs before them.
    pub warmup: u32,
    /// GPU training forwards in one pass (`GpuBatchNorm::set_single_pass`).
    pub single_pass: Option<bool>,
}

impl Case<'_> {
    /// The record of `op` taking `seconds`, set against a copy at `copy_gbps`.
    fn record(
        &self,
        op: Operation,
        backend: &str,
        device: &str,
        seconds: f64,
        copy_gbps: f64,
    ) -> Record {
        let bytes = op.ideal_bytes_per_element(self.dtype);
        self.record_named(op.name(), bytes, backend, device, seconds, copy_gbps)
    }

    /// The record of an operation named `op` with `bytes` of ideal traffic
    /// per element, taking `seconds`, set against a copy at `copy_gbps`.
    pub fn record_named(
        &self,
        op: &'static str,
        bytes: f64,
        backend: &str,
        device: &str,
        seconds: f64,
        copy_gbps: f64,
    ) -> Record {
        let n = self.shape.len();
        let gbps = n as f64 * bytes / seconds / 1e9;
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
            gbps,
            copy_gbps,
            fraction_of_copy: gbps / copy_gbps,
            gpu_time_source: None,
            gpu_over_cpu: None,
            fusion: None,
            fused_speedup: None,
        }
    }
}

/// Measures the CPU backend on one shape, storing the case's dtype.
pub fn bench_cpu(case: &Case<'_>, ops: &[Operation], run: &mut Run, pb: &ProgressBar) {
    match case.dtype {
        DType::F32 => bench_cpu_as::<f32>(case, ops, run, pb),
        DType::F16 => bench_cpu_as::<f16>(case, ops, run, pb),
    }
}

/// [`bench_cpu`] with tensors of `E`.
fn bench_cpu_as<E: CpuElement>(
    case: &Case<'_>,
    ops: &[Operation],
    run: &mut Run,
    pb: &ProgressBar,
) {
    let device = cpu_name();
    let what = format!("cpu {} {}", case.shape.name(), case.layout);
    let dims = case.shape.dims(case.layout);
    let n = case.shape.len();
    let c = case.shape.channels();
    let stored = |v: Vec<f32>| -> Vec<E> { v.into_iter().map(E::store).collect() };
    let x = stored(data(n, 1));
    let dy = stored(data(n, 2));
    let mut y = vec![E::store(0.0); n];
    let mut dx = vec![E::store(0.0); n];
    let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);

    pb.set_message(format!("cpu copy {}", case.shape.name()));
    let copy = cpu_copy_gbps(case, &x, &mut y);
    pb.inc(1);
    let copy_gbps = match copy {
        Ok(g) => g,
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
            Operation::TrainForward => time_wall(case.warmup, case.repeat, || {
                bn.forward_train_slice(&x, &dims, &mut y)
            }),
            Operation::EvalForward => time_wall(case.warmup, case.repeat, || {
                bn.forward_eval_slice(&x, &dims, &mut y)
            }),
            Operation::Backward => bn.forward_train_slice(&x, &dims, &mut y).and_then(|()| {
                time_wall(case.warmup, case.repeat, || {
                    bn.backward_slice(&x, &dy, &dims, Mode::Train, &mut dx, &mut dw, &mut db)
                })
            }),
        };
        pb.inc(1);
        match t {
            Ok(t) => run
                .records
                .push(case.record(op, "cpu", &device, t, copy_gbps)),
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
}

impl GpuData {
    fn new(ctx: &GpuContext, case: &Case<'_>) -> Result<Self> {
        let dims = case.shape.dims(case.layout);
        let n = case.shape.len();
        Ok(Self {
            x: GpuTensor::from_slice_as(ctx, &data(n, 1), &dims, case.layout, case.dtype)?,
            dy: GpuTensor::from_slice_as(ctx, &data(n, 2), &dims, case.layout, case.dtype)?,
            y: GpuTensor::uninit_as(ctx, &dims, case.layout, case.dtype)?,
            dx: GpuTensor::uninit_as(ctx, &dims, case.layout, case.dtype)?,
        })
    }
}

/// Times `f` on `ctx` by each available source: `(source, seconds or error)`.
pub fn time_sources(
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

/// The copy roofline on `ctx` for `case`, GB/s by time source, copying `x`
/// into `y`; sources that fail go to `run.skips` under `what`.
pub fn gpu_copy_gbps(
    ctx: &GpuContext,
    case: &Case<'_>,
    (x, y): (&GpuTensor, &GpuTensor),
    what: &str,
    run: &mut Run,
) -> Vec<(&'static str, f64)> {
    let n = case.shape.len() as f64;
    let mut out = Vec::new();
    for (source, t) in time_sources(ctx, case, || ctx.copy(x, y)) {
        match t {
            Ok(t) => out.push((source, n * copy_bytes_per_element(case.dtype) / t / 1e9)),
            Err(error) => run.skips.push(Skip {
                what: format!("{what} copy ({source} time)"),
                error,
            }),
        }
    }
    out
}

/// The copy roofline of the fast CPU backend for `case`, GB/s, copying `x`
/// into `y`.
///
/// # Errors
/// Those of the copy.
pub fn cpu_copy_gbps<E: CpuElement>(case: &Case<'_>, x: &[E], y: &mut [E]) -> Result<f64> {
    let t = time_wall(case.warmup, case.repeat, || parallel_copy(x, y))?;
    Ok(case.shape.len() as f64 * copy_bytes_per_element(case.dtype) / t / 1e9)
}

/// The layer of `case` on `ctx` (its channels, layout and single-pass
/// setting) and a handle for its saved statistics.
///
/// # Errors
/// As [`GpuBatchNorm::new`].
pub fn gpu_layer(ctx: &GpuContext, case: &Case<'_>) -> Result<(GpuBatchNorm, GpuSavedStats)> {
    let cfg = BatchNormConfig::new(case.shape.channels()).with_layout(case.layout);
    let mut bn = GpuBatchNorm::new(ctx, cfg)?;
    bn.set_single_pass(case.single_pass);
    let saved = GpuSavedStats::new(&bn)?;
    Ok((bn, saved))
}

/// Measures one adapter on one shape.
pub fn bench_gpu(
    ctx: &GpuContext,
    case: &Case<'_>,
    ops: &[Operation],
    run: &mut Run,
    pb: &ProgressBar,
) {
    let backend = ctx.adapter_info().backend.to_string();
    let device = ctx.name().to_string();
    let what = format!("{} {} {}", ctx.label(), case.shape.name(), case.layout);
    let setup = GpuData::new(ctx, case).and_then(|d| {
        let (bn, saved) = gpu_layer(ctx, case)?;
        Ok((d, bn, saved))
    });
    let (d, mut bn, mut saved) = match setup {
        Ok(s) => s,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(ops.len() as u64 + 1);
            return;
        }
    };
    pb.set_message(format!("{} copy {}", ctx.label(), case.shape.name()));
    let copy_gbps = gpu_copy_gbps(ctx, case, (&d.x, &d.y), &what, run);
    pb.inc(1);
    for &op in ops {
        pb.set_message(format!(
            "{} {} {}",
            ctx.label(),
            op.name(),
            case.shape.name()
        ));
        let mut train = |bn: &mut GpuBatchNorm| {
            ctx.run("training forward", |enc| {
                bn.record_forward_train(enc, &d.x, &d.y, Some(&mut saved))
            })
        };
        let times = match op {
            Operation::TrainForward => time_sources(ctx, case, || train(&mut bn)),
            Operation::EvalForward => time_sources(ctx, case, || {
                ctx.run("evaluation forward", |enc| {
                    bn.record_forward_eval(enc, &d.x, &d.y, None)
                })
            }),
            Operation::Backward => match train(&mut bn) {
                Ok(()) => time_sources(ctx, case, || {
                    ctx.run("backward", |enc| {
                        bn.record_backward(enc, &d.x, &d.dy, &saved, &d.dx)
                    })
                }),
                Err(e) => vec![("wall", Err(e))],
            },
        };
        pb.inc(1);
        for (source, t) in times {
            let copy = copy_gbps
                .iter()
                .find(|(s, _)| *s == source)
                .map_or(f64::NAN, |&(_, g)| g);
            match t {
                Ok(t) => {
                    let mut r = case.record(op, &backend, &device, t, copy);
                    r.gpu_time_source = Some(source);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_per_element() {
        for (op, dtype, bytes) in [
            (Operation::TrainForward, DType::F32, 12.0),
            (Operation::EvalForward, DType::F32, 8.0),
            (Operation::Backward, DType::F32, 20.0),
            (Operation::Backward, DType::F16, 10.0),
        ] {
            assert_eq!(op.ideal_bytes_per_element(dtype), bytes, "{op:?} {dtype}");
        }
        assert_eq!(copy_bytes_per_element(DType::F32), 8.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}

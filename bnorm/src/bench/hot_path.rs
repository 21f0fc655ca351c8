//! `bnorm bench --hot-path`: the host cost of the GPU layer's hot path, per
//! adapter and shape, in host wall time.
//!
//! - The floor: one empty command buffer submitted and waited for (raw
//!   wgpu), and [`GpuContext::run`] recording nothing (the same, plus its
//!   error scope and lock).
//! - Recording one training forward and its backward into a fresh encoder
//!   ([`GpuBatchNorm::record_forward_train`], [`GpuBatchNorm::record_backward`])
//!   after the layer's first call, then that plus `CommandEncoder::finish`,
//!   where wgpu encodes the recorded passes for the backend; the command
//!   buffer is dropped unsubmitted. With the layer's
//!   [`GpuBatchNorm::resource_counts`] before and after the timed runs.
//! - `--layers` layers, each with its own input, output and saved statistics:
//!   their training forwards recorded into one encoder and submitted once, as
//!   an app that owns the encoder does (timed as a whole and by phase:
//!   recording, finish, submit, wait), against one blocking
//!   [`GpuContext::run`] per layer. The two alternate run by run, so that a
//!   change in the machine's load falls on both.
//!
//! The floor and the recording take `20 x --repeat` timed runs (they take
//! microseconds), the layer runs `--repeat`; each figure is a median (the
//! phases' medians need not add up to the median of the whole).

use super::args::{BackendArg, BenchArgs, BenchShape};
use super::hot_report::{
    self, BLOCKING, EMPTY_RUN, EMPTY_SUBMIT, HotRecord, LAYERS_FINISH, LAYERS_RECORD,
    LAYERS_SUBMIT, LAYERS_WAIT, ONE_SUBMIT, RECORD, RECORD_FINISH, Resources,
};
use super::measure::{Skip, data, median};
use super::{OutputError, progress, write_file};
use crate::EXIT_USAGE;
use indicatif::ProgressBar;
use std::time::Instant;
use wgpu_batchnorm::wgpu;
use wgpu_batchnorm::{
    BatchNormConfig, DType, Error, GpuBatchNorm, GpuContext, GpuSavedStats, GpuTensor, Layout,
    Result,
};

/// Timed runs of the floor and of the recording per `--repeat`.
const FAST_REPEAT_FACTOR: u32 = 20;

/// Seconds since `t`.
fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// A new command encoder on `ctx`'s device.
fn encoder(ctx: &GpuContext, label: &str) -> wgpu::CommandEncoder {
    ctx.device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
}

/// Waits for everything submitted to `ctx`'s queue.
fn wait(ctx: &GpuContext, during: &str) -> Result<()> {
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| Error::Wgpu {
            during: during.into(),
            message: e.to_string(),
        })
}

/// Medians of the columns of `rows`.
fn medians<const N: usize>(rows: &[[f64; N]]) -> [f64; N] {
    std::array::from_fn(|i| median(rows.iter().map(|r| r[i]).collect()))
}

/// What every record of one adapter and shape shares.
struct Case<'a> {
    ctx: &'a GpuContext,
    shape: Option<&'a BenchShape>,
    layout: Layout,
    dtype: DType,
    warmup: u32,
    repeat: u32,
}

impl Case<'_> {
    fn record(&self, measurement: &'static str, calls: u32, repeat: u32, s: f64) -> HotRecord {
        let info = self.ctx.adapter_info();
        HotRecord {
            measurement,
            backend: info.backend.to_string(),
            device: info.name.clone(),
            shape: self.shape.map(BenchShape::name),
            layout: self.shape.map(|_| self.layout.name()),
            dtype: self.shape.map(|_| self.dtype.name()),
            calls,
            repeat,
            median_s: s,
            per_call_s: s / f64::from(calls),
            resources_before: None,
            resources_after: None,
        }
    }

    fn fast_repeat(&self) -> u32 {
        self.repeat.saturating_mul(FAST_REPEAT_FACTOR)
    }

    /// One tensor of the case's shape: `Some(seed)` filled with data, `None` uninitialized.
    fn tensor(&self, seed: Option<u64>) -> Result<GpuTensor> {
        let shape = self.shape.expect("a case with a shape");
        let dims = shape.dims(self.layout);
        match seed {
            Some(s) => GpuTensor::from_slice_as(
                self.ctx,
                &data(shape.len(), s),
                &dims,
                self.layout,
                self.dtype,
            ),
            None => GpuTensor::uninit_as(self.ctx, &dims, self.layout, self.dtype),
        }
    }

    /// A layer for the case's shape and layout.
    fn layer(&self) -> Result<GpuBatchNorm> {
        let c = self.shape.expect("a case with a shape").channels();
        GpuBatchNorm::new(self.ctx, BatchNormConfig::new(c).with_layout(self.layout))
    }
}

/// The floor: an empty submit and wait, raw and through [`GpuContext::run`].
fn floor(case: &Case<'_>) -> Result<[HotRecord; 2]> {
    let (ctx, repeat) = (case.ctx, case.fast_repeat());
    let empty_submit = || -> Result<f64> {
        let t = Instant::now();
        ctx.queue().submit([encoder(ctx, "bnorm.empty").finish()]);
        wait(ctx, "an empty submit")?;
        Ok(since(t))
    };
    let empty_run = || -> Result<f64> {
        let t = Instant::now();
        ctx.run("bnorm.empty", |_| Ok(()))?;
        Ok(since(t))
    };
    for _ in 0..case.warmup {
        empty_submit()?;
        empty_run()?;
    }
    let (mut raw, mut run) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        raw.push(empty_submit()?);
        run.push(empty_run()?);
    }
    Ok([
        case.record(EMPTY_SUBMIT, 1, repeat, median(raw)),
        case.record(EMPTY_RUN, 1, repeat, median(run)),
    ])
}

/// Host time to record one training forward + backward after the first
/// call, without and with `CommandEncoder::finish` (wgpu encodes the passes
/// for the backend there).
fn record_cost(case: &Case<'_>) -> Result<[HotRecord; 2]> {
    let ctx = case.ctx;
    let (x, dy) = (case.tensor(Some(1))?, case.tensor(Some(2))?);
    let (y, dx) = (case.tensor(None)?, case.tensor(None)?);
    let mut bn = case.layer()?;
    let mut saved = GpuSavedStats::new(&bn)?;
    // The first call creates the layer's uniform blocks and bind groups.
    ctx.run("bnorm.first training step", |enc| {
        bn.record_forward_train(enc, &x, &y, Some(&mut saved))?;
        bn.record_backward(enc, &x, &dy, &saved, &dx)
    })?;
    let before = bn.resource_counts();
    let mut step = || -> Result<[f64; 2]> {
        let mut enc = encoder(ctx, "bnorm.record");
        let t = Instant::now();
        bn.record_forward_train(&mut enc, &x, &y, Some(&mut saved))?;
        bn.record_backward(&mut enc, &x, &dy, &saved, &dx)?;
        let recorded = since(t);
        let commands = enc.finish();
        let finished = since(t);
        // Dropped unsubmitted: the host's part is what is measured.
        drop(commands);
        Ok([recorded, finished])
    };
    for _ in 0..case.warmup {
        step()?;
    }
    let repeat = case.fast_repeat();
    let times = (0..repeat).map(|_| step()).collect::<Result<Vec<_>>>()?;
    let [recorded, finished] = medians(&times);
    let mut r = case.record(RECORD, 1, repeat, recorded);
    r.resources_before = Some(Resources::sum([before]));
    r.resources_after = Some(Resources::sum([bn.resource_counts()]));
    Ok([r, case.record(RECORD_FINISH, 1, repeat, finished)])
}

/// One layer of the many-layers runs.
struct Layer {
    bn: GpuBatchNorm,
    x: GpuTensor,
    y: GpuTensor,
    saved: GpuSavedStats,
}

/// `layers` training forwards in one submission against as many blocking calls.
fn many_layers(case: &Case<'_>, layers: u32) -> Result<[HotRecord; 6]> {
    let ctx = case.ctx;
    let mut net = (0..layers)
        .map(|i| {
            let bn = case.layer()?;
            Ok(Layer {
                x: case.tensor(Some(100 + u64::from(i)))?,
                y: case.tensor(None)?,
                saved: GpuSavedStats::new(&bn)?,
                bn,
            })
        })
        .collect::<Result<Vec<Layer>>>()?;
    let record_all = |net: &mut [Layer], enc: &mut wgpu::CommandEncoder| -> Result<()> {
        for l in net {
            l.bn.record_forward_train(enc, &l.x, &l.y, Some(&mut l.saved))?;
        }
        Ok(())
    };
    // The first call of every layer creates its uniform blocks and bind groups.
    ctx.run("bnorm.layers first", |enc| record_all(&mut net, enc))?;
    let counts = |net: &[Layer]| Resources::sum(net.iter().map(|l| l.bn.resource_counts()));
    let before = counts(&net);
    // One submission as an app makes it: (recording, finish, submit, wait, total).
    let one_submit = |net: &mut [Layer]| -> Result<[f64; 5]> {
        let t = Instant::now();
        let mut enc = encoder(ctx, "bnorm.layers one submit");
        let t0 = Instant::now();
        record_all(net, &mut enc)?;
        let t1 = Instant::now();
        let commands = enc.finish();
        let t2 = Instant::now();
        ctx.queue().submit([commands]);
        let t3 = Instant::now();
        wait(ctx, "one submission of the layers")?;
        let t4 = Instant::now();
        Ok([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t].map(|d| d.as_secs_f64()))
    };
    let blocking = |net: &mut [Layer]| -> Result<f64> {
        let t = Instant::now();
        for l in net {
            ctx.run("bnorm.layers blocking", |enc| {
                l.bn.record_forward_train(enc, &l.x, &l.y, Some(&mut l.saved))
            })?;
        }
        Ok(since(t))
    };
    for _ in 0..case.warmup {
        one_submit(&mut net)?;
        blocking(&mut net)?;
    }
    let (mut one, mut block) = (Vec::new(), Vec::new());
    for _ in 0..case.repeat {
        one.push(one_submit(&mut net)?);
        block.push(blocking(&mut net)?);
    }
    let after = counts(&net);
    let counted = |mut r: HotRecord| {
        r.resources_before = Some(before);
        r.resources_after = Some(after);
        r
    };
    let [record, finish, submit, wait, total] = medians(&one);
    let phase = |m, s| case.record(m, layers, case.repeat, s);
    Ok([
        phase(LAYERS_RECORD, record),
        phase(LAYERS_FINISH, finish),
        phase(LAYERS_SUBMIT, submit),
        phase(LAYERS_WAIT, wait),
        counted(phase(ONE_SUBMIT, total)),
        counted(phase(BLOCKING, median(block))),
    ])
}

/// Everything `--hot-path` measured.
#[derive(Default)]
struct HotRun {
    records: Vec<HotRecord>,
    skips: Vec<Skip>,
    notes: Vec<String>,
}

impl HotRun {
    fn push<const N: usize>(&mut self, what: String, r: Result<[HotRecord; N]>) {
        match r {
            Ok(r) => self.records.extend(r),
            Err(error) => self.skips.push(Skip { what, error }),
        }
    }
}

/// Measures one adapter: the floor, then each shape.
fn bench_adapter(ctx: &GpuContext, args: &BenchArgs, run: &mut HotRun, pb: &ProgressBar) {
    let want_layout = Layout::from(args.layout);
    let mut case = Case {
        ctx,
        shape: None,
        layout: want_layout,
        dtype: DType::from(args.dtype),
        warmup: args.warmup(),
        repeat: args.repeat(),
    };
    pb.set_message(format!("{} empty submits", ctx.label()));
    run.push(format!("{} empty submit", ctx.label()), floor(&case));
    pb.inc(1);
    let shapes = args.shapes();
    for shape in &shapes {
        case.shape = Some(shape);
        case.layout = if want_layout == Layout::ChannelsLast && shape.0.len() < 3 {
            Layout::ChannelsFirst
        } else {
            want_layout
        };
        let what = format!("{} {} {}", ctx.label(), shape.name(), case.layout);
        pb.set_message(format!("{what}: recording"));
        run.push(format!("{what} recording"), record_cost(&case));
        pb.inc(1);
        pb.set_message(format!("{what}: {} layers", args.layers));
        run.push(
            format!("{what} {} layers", args.layers),
            many_layers(&case, args.layers),
        );
        pb.inc(1);
    }
}

/// Runs `bnorm bench --hot-path` and returns its exit status: 0 when every
/// measurement ran, 1 when one failed or nothing could be measured, 2 for
/// `--backend cpu` (the hot path is the GPU layer's).
///
/// # Errors
/// When `--json` cannot be written.
pub fn run(args: &BenchArgs) -> Result<u8, OutputError> {
    if args.backend == BackendArg::Cpu {
        eprintln!(
            "bnorm bench: error: --hot-path measures the GPU layer; --backend cpu leaves nothing to measure"
        );
        return Ok(EXIT_USAGE);
    }
    let mut run = HotRun::default();
    let contexts = super::open_gpus(args.adapter.as_deref(), &mut run.skips, &mut run.notes);
    let shapes = args.shapes();
    if Layout::from(args.layout) == Layout::ChannelsLast {
        for s in shapes.iter().filter(|s| s.0.len() < 3) {
            run.notes.push(format!(
                "{} has no channels-last form (rank 2); measured as NCHW",
                s.name()
            ));
        }
    }
    let pb = progress((contexts.len() * (1 + 2 * shapes.len())) as u64);
    for ctx in &contexts {
        bench_adapter(ctx, args, &mut run, &pb);
    }
    pb.finish_and_clear();

    let (repeat, warmup, layers) = (args.repeat(), args.warmup(), args.layers);
    println!(
        "bnorm bench --hot-path: host wall time, median of {repeat} runs of the {layers}-layer \
         measurements and {} of the others, after {warmup} warm-up and a first call of each layer. \
         \"empty submit + wait\": one empty command buffer submitted, then a wait for the device (the \
         floor). \"record train fwd + backward\": recording one training forward and its backward \
         into an encoder, then with encoder.finish() (where wgpu encodes the passes); not submitted. \
         \"{layers} train fwd\": {layers} layers' training forwards recorded into one encoder and \
         submitted once (the whole, and its phases: recording, finish, submit, wait), or run as \
         {layers} blocking calls (GpuContext::run each). New buffers / bind groups: created by the \
         layers during the warm-up and timed runs.\n",
        repeat.saturating_mul(FAST_REPEAT_FACTOR)
    );
    print!("{}", hot_report::table(&run.records));
    println!();
    print!("{}", hot_report::conclusions(&run.records));
    super::print_notes_and_skips(&run.notes, &run.skips);
    if let Some(path) = &args.json {
        write_file(path, &hot_report::to_json(&run.records)?)?;
        eprintln!("wrote {} records to {}", run.records.len(), path.display());
    }
    let failed = run.skips.iter().any(Skip::is_failure);
    Ok(u8::from(failed || run.records.is_empty()))
}

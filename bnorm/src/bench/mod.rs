//! `bnorm bench`: CPU vs GPU throughput of BatchNorm, against a copy kernel
//! measured on the same device in the same run.
//!
//! For each operation (training forward, evaluation forward, backward) and
//! shape, on the fast CPU backend ([`CpuBatchNorm`](wgpu_batchnorm::CpuBatchNorm))
//! and on every GPU adapter:
//!
//! - the median time over `--repeat` runs after `--warmup` runs;
//! - GB/s of the ideal traffic per element
//!   ([`Operation::ideal_bytes_per_element`](wgpu_batchnorm::Operation::ideal_bytes_per_element):
//!   f32 train forward 12 B, eval 8 B, backward 20 B; f16 storage half);
//! - that figure as a fraction of a copy measured on the same device in the
//!   same run (GPU: the vec4 kernel of
//!   [`GpuContext::copy`](wgpu_batchnorm::GpuContext::copy); CPU:
//!   [`parallel_copy`](wgpu_batchnorm::cpu::parallel_copy); 8 B per element for f32, 4 B for f16);
//! - on GPUs, the time both from timestamp queries (GPU time of the passes,
//!   where the adapter has `TIMESTAMP_QUERY`) and from the wall clock around
//!   submit-and-wait, each in its own record (`gpu_time_source`), each
//!   against a copy timed the same way; and the GPU/CPU ratio (CPU time over
//!   GPU time for the same op, shape, layout and dtype).
//!
//! Results: a table on stdout ([`table`](table::table)), `--json FILE` (one
//! record per measurement, [`Record`](record::Record)), `--svg FILE` (GB/s per
//! shape, CPU vs GPU, copy rooflines dashed, [`svg`]). Progress goes to stderr.
//!
//! `--hot-path` measures instead the host cost of the GPU layer's recording
//! and submission path ([`hot_path`]).

mod args;
mod fused;
mod hot_path;
mod hot_report;
mod measure;
mod record;
mod svg;
mod table;
mod unfused;

pub use args::BenchArgs;

use crate::gpus::open_adapters;
use args::{BackendArg, OpArg};
use indicatif::{ProgressBar, ProgressStyle};
use measure::{Case, Run, Skip, bench_cpu, bench_gpu};
use std::fmt;
use std::path::Path;
use wgpu_batchnorm::{AdapterSelection, DType, Layout};

/// A file `bnorm bench` was asked to write (`--json`, `--svg`) could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot write {}: {}", self.path, self.message)
    }
}

impl std::error::Error for OutputError {}

/// Writes `text` to `path`.
fn write_file(path: &Path, text: &str) -> Result<(), OutputError> {
    std::fs::write(path, text).map_err(|e| OutputError {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A progress bar of `steps` steps on stderr.
fn progress(steps: u64) -> ProgressBar {
    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Runs `bnorm bench` and returns its exit status: 0 when every measurement
/// ran (unsupported combinations, e.g. f16 on an adapter without it, are noted but not
/// failures), 1 when one failed or nothing could be measured.
///
/// # Errors
/// When `--json` or `--svg` cannot be written.
pub fn run(args: &BenchArgs) -> Result<u8, OutputError> {
    if args.hot_path {
        return hot_path::run(args);
    }
    let shapes = args.shapes();
    let (repeat, warmup) = (args.repeat(), args.warmup());
    let ops = args.op.operations();
    let dtype = DType::from(args.dtype);
    let want_layout = Layout::from(args.layout);
    let mut run = Run::default();
    let cpu = args.backend != BackendArg::Gpu;
    let gpus = if args.backend == BackendArg::Cpu {
        Vec::new()
    } else {
        open_gpus(args.adapter.as_deref(), &mut run.skips, &mut run.notes)
    };
    let backends = usize::from(cpu) + gpus.len();
    let steps = (shapes.len() * backends * (ops.len() + 1)) as u64;
    let pb = progress(steps);
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
            single_pass: args.single_pass.into(),
        };
        if args.op == OpArg::Fused {
            if cpu {
                fused::bench_cpu(&case, args.fusion, &mut run, &pb);
            }
            for ctx in &gpus {
                fused::bench_gpu(ctx, &case, args.fusion, &mut run, &pb);
            }
            continue;
        }
        if cpu {
            bench_cpu(&case, &ops, &mut run, &pb);
        }
        for ctx in &gpus {
            bench_gpu(ctx, &case, &ops, &mut run, &pb);
        }
    }
    pb.finish_and_clear();
    record::fill_ratios(&mut run.records);
    record::fill_speedups(&mut run.records);

    if args.op == OpArg::Fused {
        println!(
            "--op fused: fused_* = BatchNorm fused with {}, unfused_* = the plain BatchNorm, then \
             the add and the ReLU as separate passes in place (backward: the ReLU's backward pass, \
             then the plain backward); both counted against the fused op's floor (f32 per element: \
             training forward 12 B + 4 with the residual, evaluation 8 + 4, backward 28 with ReLU, \
             20 + 4 without); \"vs unfused\": unfused time / fused time.",
            args.fusion.name()
        );
    }
    println!(
        "bnorm bench: median of {repeat} runs after {warmup} warm-up; GB/s of ideal traffic \
         (per element, f32: train 12 B, eval 8 B, backward 20 B; f16 half); \"of copy\": against a copy \
         on the same device in this run, timed the same way (GPU: vec4 kernel, CPU: all threads; 8 B per \
         f32 element); GPU/CPU: CPU time / GPU time. GPU \"time from\": timestamp = GPU time between \
         timestamp queries, wall = host clock around submit and wait.\n"
    );
    print!("{}", table::table(&run.records));
    print_notes_and_skips(&run.notes, &run.skips);
    if let Some(path) = &args.json {
        write_file(path, &record::to_json(&run.records)?)?;
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
            svg::write_svg(path, &run.records, &title)?;
            eprintln!("wrote the chart to {}", path.display());
        }
    }
    let failed = run.skips.iter().any(Skip::is_failure);
    Ok(u8::from(failed || run.records.is_empty()))
}

/// The remarks and the cases not measured (or failed) that close a run's output.
fn print_notes_and_skips(notes: &[String], skips: &[measure::Skip]) {
    for note in notes {
        println!("note: {note}");
    }
    for s in skips {
        let kind = if s.is_failure() {
            "FAILED"
        } else {
            "not measured"
        };
        println!("{kind}: {}: {}", s.what, s.error);
    }
}

/// The GPU adapters a run measures (narrowed by `--adapter`): those that fail
/// to open go to `skips`, and a note says so when none is left.
fn open_gpus(
    adapter: Option<&str>,
    skips: &mut Vec<measure::Skip>,
    notes: &mut Vec<String>,
) -> Vec<wgpu_batchnorm::GpuContext> {
    let opened = open_adapters(&AdapterSelection::from_env(), adapter);
    skips.extend(opened.failed.into_iter().map(|f| measure::Skip {
        what: format!("{} (all measurements)", f.label),
        error: f.error,
    }));
    if opened.contexts.is_empty() {
        notes.push(match adapter {
            Some(a) => format!("no GPU adapter matches --adapter {a:?}"),
            None => "no GPU adapter found (see `bnorm adapters`)".into(),
        });
    }
    opened.contexts
}

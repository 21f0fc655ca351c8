//! `bnorm`: the command-line tool of wgpu-batchnorm.
//!
//! ```text
//! bnorm adapters                       every adapter wgpu finds, with limits and features
//! bnorm check tests/fixtures           PyTorch parity fixtures on the CPU reference and every adapter
//! bnorm layers model.safetensors       the BatchNorm layers of a PyTorch state_dict
//! bnorm fold model.safetensors -o folded.safetensors   BatchNorms folded into the layers before them
//! bnorm bench --quick                  CPU vs GPU throughput against a copy kernel
//! bnorm bench --hot-path               host cost of recording and submitting on every adapter
//! ```
//!
//! Results go to stdout, progress and warnings to stderr; `RUST_LOG=info`
//! (or `debug`, `wgpu_core=warn,...`) shows more.

mod adapters;
mod bench;
mod check;
mod fold;
mod gpus;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wgpu_batchnorm::StateDict;

/// Exit status for usage and I/O errors (clap uses it for bad arguments too).
pub(crate) const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "bnorm",
    version,
    about = "Batch Normalization on any GPU wgpu reaches: adapters, PyTorch parity checks, benchmarks",
    after_help = "Environment: WGPU_BACKEND, WGPU_ADAPTER_NAME and WGPU_POWER_PREF narrow the adapters \
                  (the flags narrow further); RUST_LOG sets the log level (default warn)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every adapter wgpu finds, with its limits and features.
    ///
    /// Backend, device type, driver, the limits this crate depends on, the
    /// optional features it uses (SHADER_F16, SUBGROUP, TIMESTAMP_QUERY) and
    /// whether the adapter runs compute shaders.
    Adapters(gpus::Selection),
    /// Run PyTorch parity fixtures on every backend.
    ///
    /// Each batchnorm-fixture/1 file runs on the CPU reference, the fast CPU
    /// backend and every adapter: one row per fixture and backend (PASS/FAIL,
    /// worst tensor and its error, the reason on failure), then
    /// `N passed, M failed`. Exit status 1 when anything failed, 2 for usage
    /// and I/O errors.
    Check(check::CheckArgs),
    /// List the BatchNorm layers of a safetensors state_dict.
    ///
    /// Prefix, channels, affine, num_batches_tracked, in module order.
    Layers(LayersArgs),
    /// Fold every BatchNorm of a safetensors state_dict into the layer before it.
    ///
    /// For inference: each BatchNorm's running statistics and affine
    /// parameters go into the weight and bias of the convolution or linear
    /// layer it follows, and its keys leave the file. Pairs come from the
    /// module paths: a Sequential index (`features.1` follows `features.0`)
    /// or `bn` in the name (`layer1.0.bn1` follows `layer1.0.conv1`, `fc1` or
    /// `linear1`); `--pair` gives the others. One line per fold, then a
    /// summary. Exit status 1 when a BatchNorm cannot be folded (nothing is
    /// written), 2 for I/O errors.
    Fold(fold::FoldArgs),
    /// Measure CPU vs GPU throughput against a copy kernel, or the GPU hot path.
    ///
    /// Per operation and shape: median time, GB/s of the ideal traffic, and
    /// the fraction of a copy kernel timed on the same device in the same
    /// run; a table, `--json FILE`, `--svg FILE`.
    ///
    /// With `--hot-path`, per adapter and shape instead: the host time to
    /// record a training forward + backward, `--layers` training forwards in
    /// one submission against as many blocking calls, and the floor (one
    /// empty submit and wait); a table, what it says, `--json FILE`.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct LayersArgs {
    /// A safetensors file holding a PyTorch state_dict.
    #[arg(value_name = "CHECKPOINT")]
    file: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Adapters(sel) => adapters::adapters(&sel),
        Command::Check(args) => check::check(&args),
        Command::Layers(args) => layers(&args),
        Command::Fold(args) => fold::fold(&args),
        Command::Bench(args) => bench(&args),
    }
}

fn bench(args: &bench::BenchArgs) -> ExitCode {
    match bench::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bnorm bench: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn layers(args: &LayersArgs) -> ExitCode {
    let sd = match StateDict::open(&args.file) {
        Ok(sd) => sd,
        Err(e) => {
            eprintln!("bnorm layers: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let layers = sd.batchnorm_layers();
    if layers.is_empty() {
        eprintln!(
            "no BatchNorm layers (prefixes with running_mean and running_var) in {}",
            args.file.display()
        );
        return ExitCode::from(1);
    }
    for l in layers {
        println!("{l}");
    }
    ExitCode::SUCCESS
}

//! `bnorm`: the command-line tool of wgpu-batchnorm.
//!
//! ```text
//! bnorm adapters                       every adapter wgpu finds, with limits and features
//! bnorm check tests/fixtures           PyTorch parity fixtures on the CPU reference and every adapter
//! bnorm layers model.safetensors       the BatchNorm layers of a PyTorch state_dict
//! bnorm bench --quick                  CPU vs GPU throughput against a copy kernel
//! ```
//!
//! Results go to stdout, progress and warnings to stderr; `RUST_LOG=info`
//! (or `debug`, `wgpu_core=warn,...`) shows more.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::process::ExitCode;
use wgpu_batchnorm::fixture::{
    CpuFastTarget, CpuTarget, Fixture, FixtureReport, FixtureTarget, collect_fixture_files,
    run_fixture,
};
use wgpu_batchnorm::gpu::{enumerate_adapters, parse_backend};
use wgpu_batchnorm::{AdapterSelection, Error, GpuContext, StateDict};

/// Exit status for usage and I/O errors (clap uses it for bad arguments too).
const EXIT_USAGE: u8 = 2;

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
    Adapters(Selection),
    /// Run PyTorch parity fixtures on every backend.
    ///
    /// Each batchnorm-fixture/1 file runs on the CPU reference, the fast CPU
    /// backend and every adapter: one row per fixture and backend (PASS/FAIL,
    /// worst tensor and its error, the reason on failure), then
    /// `N passed, M failed`. Exit status 1 when anything failed, 2 for usage
    /// and I/O errors.
    Check(CheckArgs),
    /// List the BatchNorm layers of a safetensors state_dict.
    ///
    /// Prefix, channels, affine, num_batches_tracked, in module order.
    Layers(LayersArgs),
    /// Measure CPU vs GPU throughput against a copy kernel.
    ///
    /// Per operation and shape: median time, GB/s of the ideal traffic, and
    /// the fraction of a copy kernel timed on the same device in the same
    /// run; a table, `--json FILE`, `--svg FILE`.
    Bench(wgpu_batchnorm::bench::BenchArgs),
}

/// Which adapters to use.
#[derive(Debug, Clone, Args)]
struct Selection {
    /// Only adapters whose name contains NAME (case-insensitive).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Only these backends (vulkan, gl, metal, dx12; repeat or separate with commas).
    #[arg(long, value_name = "BACKEND", value_delimiter = ',', value_parser = backend_arg)]
    backend: Vec<wgpu_batchnorm::wgpu::Backend>,
}

impl Selection {
    fn adapter_selection(&self) -> AdapterSelection {
        let mut sel = AdapterSelection::from_env();
        if !self.backend.is_empty() {
            sel.backends = self
                .backend
                .iter()
                .fold(wgpu_batchnorm::wgpu::Backends::empty(), |acc, &b| {
                    acc | wgpu_batchnorm::wgpu::Backends::from(b)
                });
        }
        if let Some(name) = &self.adapter {
            sel = sel.with_name(name.clone());
        }
        sel
    }
}

fn backend_arg(s: &str) -> Result<wgpu_batchnorm::wgpu::Backend, String> {
    parse_backend(s)
        .ok_or_else(|| format!("unknown backend {s:?}; expected vulkan, gl, metal or dx12"))
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Fixture files, or folders whose *.safetensors files are checked in name order.
    #[arg(value_name = "FIXTURE", required = true)]
    fixtures: Vec<PathBuf>,
    #[command(flatten)]
    selection: Selection,
    /// Only the CPU backends (the f64 reference and the fast f32 one).
    #[arg(long, conflicts_with_all = ["no_cpu", "require_gpu"])]
    cpu_only: bool,
    /// Skip the CPU backends.
    #[arg(long)]
    no_cpu: bool,
    /// Exit with status 1 when no GPU adapter runs the fixtures.
    #[arg(long)]
    require_gpu: bool,
    /// Print every tensor comparison under its row.
    #[arg(short, long)]
    verbose: bool,
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
        Command::Adapters(sel) => adapters(&sel),
        Command::Check(args) => check(&args),
        Command::Layers(args) => layers(&args),
        Command::Bench(args) => bench(&args),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{n} ({} MiB)", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{n} ({} KiB)", n / KIB)
    } else {
        n.to_string()
    }
}

fn adapters(sel: &Selection) -> ExitCode {
    let selection = sel.adapter_selection();
    eprintln!(
        "enumerating adapters for backends {:?}...",
        selection.backends
    );
    let adapters = enumerate_adapters(&selection);
    if adapters.is_empty() {
        eprintln!(
            "\n*** {} ***\n",
            Error::NoAdapter {
                selection: format!(" among backends {:?}", selection.backends)
            }
        );
        return ExitCode::from(1);
    }
    use wgpu_batchnorm::wgpu::{DownlevelFlags, Features};
    let mut out = std::io::stdout().lock();
    for (i, a) in adapters.iter().enumerate() {
        let info = a.get_info();
        let l = a.limits();
        let f = a.features();
        let compute = a
            .get_downlevel_capabilities()
            .flags
            .contains(DownlevelFlags::COMPUTE_SHADERS);
        let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
            (true, true) => "(not reported)".to_string(),
            (false, true) => info.driver.clone(),
            (true, false) => info.driver_info.clone(),
            (false, false) => format!("{} ({})", info.driver, info.driver_info),
        };
        let _ = writeln!(out, "#{i} {}: {}", info.backend, info.name);
        let _ = writeln!(
            out,
            "    type {:?}, vendor {:#06x}, device {:#06x}",
            info.device_type, info.vendor, info.device
        );
        let _ = writeln!(out, "    driver: {driver}");
        let _ = writeln!(out, "    compute shaders: {}", yes_no(compute));
        let rows: [(&str, String); 6] = [
            (
                "max_storage_buffer_binding_size",
                bytes(l.max_storage_buffer_binding_size),
            ),
            ("max_buffer_size", bytes(l.max_buffer_size)),
            (
                "max_compute_workgroup_size_x",
                l.max_compute_workgroup_size_x.to_string(),
            ),
            (
                "max_compute_invocations_per_workgroup",
                l.max_compute_invocations_per_workgroup.to_string(),
            ),
            (
                "max_compute_workgroups_per_dimension",
                l.max_compute_workgroups_per_dimension.to_string(),
            ),
            (
                "max_compute_workgroup_storage_size",
                bytes(u64::from(l.max_compute_workgroup_storage_size)),
            ),
        ];
        let _ = writeln!(out, "    limits:");
        for (name, value) in rows {
            let _ = writeln!(out, "      {name:<40} {value}");
        }
        let subgroup = if f.contains(Features::SUBGROUP) {
            format!(
                "yes (size {}..{})",
                info.subgroup_min_size, info.subgroup_max_size
            )
        } else {
            "no".to_string()
        };
        let _ = writeln!(
            out,
            "    features: SHADER_F16 {}, SUBGROUP {subgroup}, TIMESTAMP_QUERY {}",
            yes_no(f.contains(Features::SHADER_F16)),
            yes_no(f.contains(Features::TIMESTAMP_QUERY))
        );
    }
    ExitCode::SUCCESS
}

/// A device that matched but could not be opened: every fixture FAILs on it.
struct Broken {
    name: String,
    error: String,
}

fn gpu_targets(sel: &Selection) -> (Vec<GpuContext>, Vec<Broken>) {
    let selection = sel.adapter_selection();
    let mut ok = Vec::new();
    let mut broken = Vec::new();
    for adapter in enumerate_adapters(&selection) {
        let info = adapter.get_info();
        let name = format!("{}:{}", info.backend, info.name);
        eprintln!("opening {name}...");
        match GpuContext::from_adapter(&adapter) {
            Ok(ctx) => ok.push(ctx),
            Err(e @ Error::Unsupported { .. }) => {
                eprintln!("warning: skipping {name}: it cannot run this crate ({e})");
            }
            Err(e) => {
                eprintln!("error: cannot open {name}: {e}");
                broken.push(Broken {
                    name,
                    error: format!("could not open the device: {e}"),
                });
            }
        }
    }
    (ok, broken)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

struct Table {
    case_width: usize,
    backend_width: usize,
    verbose: bool,
    passed: usize,
    failed: usize,
}

impl Table {
    fn row(&mut self, r: &FixtureReport) {
        let verdict = if r.passed() {
            self.passed += 1;
            "PASS"
        } else {
            self.failed += 1;
            "FAIL"
        };
        let worst = match r.worst() {
            Some(w) => {
                let share = if w.ratio.is_finite() {
                    format!("{:.1}%", w.ratio * 100.0)
                } else {
                    "NaN/inf".to_string()
                };
                format!("{:<16} {:>9.2e} {share:>9} of tol", w.name, w.max_abs_error)
            }
            None => format!("{:<16} {:>9} {:>9}       ", "-", "-", ""),
        };
        let mut line = format!(
            "{:<cw$}  {:<bw$}  {verdict}  {worst}",
            r.case,
            r.backend,
            cw = self.case_width,
            bw = self.backend_width
        );
        if let Some(reason) = r.reason() {
            line.push_str("  ");
            line.push_str(&reason);
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", line.trim_end());
        if self.verbose {
            for c in &r.checks {
                let _ = writeln!(out, "      {c}");
            }
        }
        let _ = out.flush();
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let files = match collect_fixture_files(&args.fixtures) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bnorm check: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if files.is_empty() {
        eprintln!(
            "bnorm check: error: no fixture files (*.safetensors) in {}",
            args.fixtures
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::from(EXIT_USAGE);
    }

    let mut targets: Vec<Box<dyn FixtureTarget>> = Vec::new();
    if !args.no_cpu {
        targets.push(Box::new(CpuTarget));
        targets.push(Box::new(CpuFastTarget));
    }
    let (gpus, broken) = if args.cpu_only {
        (Vec::new(), Vec::new())
    } else {
        gpu_targets(&args.selection)
    };
    let no_gpu = !args.cpu_only && gpus.is_empty() && broken.is_empty();
    if no_gpu {
        eprintln!(
            "\n*** NO GPU ADAPTER: {}; {} ***\n",
            Error::NoAdapter {
                selection: format!(
                    " among backends {:?}",
                    args.selection.adapter_selection().backends
                )
            },
            if args.no_cpu {
                "nothing to run"
            } else {
                "only the CPU reference runs"
            }
        );
        if args.no_cpu {
            return ExitCode::from(1);
        }
    }
    targets.extend(
        gpus.into_iter()
            .map(|g| Box::new(g) as Box<dyn FixtureTarget>),
    );

    let names: Vec<String> = targets
        .iter()
        .map(|t| t.name())
        .chain(broken.iter().map(|b| b.name.clone()))
        .collect();
    eprintln!(
        "checking {} fixture file(s) on {} backend(s): {}",
        files.len(),
        names.len(),
        names.join(", ")
    );
    let case_width = files
        .iter()
        .filter_map(|f| f.file_stem().map(|s| s.to_string_lossy().chars().count()))
        .max()
        .unwrap_or(4)
        .clamp(4, 40);
    let backend_width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut table = Table {
        case_width,
        backend_width,
        verbose: args.verbose,
        passed: 0,
        failed: 0,
    };

    for file in &files {
        let path = file.display().to_string();
        let fixture = match Fixture::load(file) {
            Ok(f) => f,
            Err(e) => {
                table.row(&FixtureReport::load_failure(&path, "-", &e));
                continue;
            }
        };
        for target in &targets {
            let report = catch_unwind(AssertUnwindSafe(|| run_fixture(&fixture, target.as_ref())))
                .unwrap_or_else(|payload| FixtureReport {
                    case: fixture.case.clone(),
                    path: path.clone(),
                    backend: target.name(),
                    checks: Vec::new(),
                    failures: vec![format!("panicked: {}", panic_message(payload.as_ref()))],
                });
            table.row(&report);
        }
        for b in &broken {
            table.row(&FixtureReport {
                case: fixture.case.clone(),
                path: path.clone(),
                backend: b.name.clone(),
                checks: Vec::new(),
                failures: vec![b.error.clone()],
            });
        }
    }

    println!("{} passed, {} failed", table.passed, table.failed);
    if args.require_gpu && no_gpu {
        eprintln!(
            "bnorm check: error: --require-gpu was given but no GPU adapter ran the fixtures"
        );
        return ExitCode::from(1);
    }
    if table.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn bench(args: &wgpu_batchnorm::bench::BenchArgs) -> ExitCode {
    match wgpu_batchnorm::bench::run_cli(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
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

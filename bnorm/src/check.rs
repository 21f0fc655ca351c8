//! `bnorm check`: PyTorch parity fixtures on the CPU backends and every
//! adapter, a row per fixture and backend, then `N passed, M failed`.

use crate::EXIT_USAGE;
use crate::gpus::{Selection, open_adapters};
use clap::Args;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wgpu_batchnorm::fixture::{
    CpuFastTarget, CpuTarget, Fixture, FixtureReport, FixtureTarget, run_fixture,
};
use wgpu_batchnorm::{Error, Result};

/// Arguments of `bnorm check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Fixture files, or folders whose *.safetensors files (subfolders included;
    /// there, files of another `format` are left out) are checked in path order.
    #[arg(value_name = "FIXTURE", required = true)]
    fixtures: Vec<PathBuf>,
    #[command(flatten)]
    selection: Selection,
    /// Only the CPU backends (the f64 reference and the fast one, f32 or f16).
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

/// Expands `paths` into fixture files: files as given, folders scanned
/// recursively for `*.safetensors`, sorted by path. In the subfolders of a
/// folder given, a file whose `format` metadata names another format (the
/// folding fixtures, a PyTorch `state_dict`) is not a fixture and is left
/// out, counted in the second value; every other file is checked, so a
/// malformed fixture is a FAIL row, not a skip.
///
/// # Errors
/// [`Error::Io`] for a path that does not exist or a folder that cannot be read.
fn collect_fixture_files<P: AsRef<Path>>(paths: &[P]) -> Result<(Vec<PathBuf>, usize)> {
    let mut out = Vec::new();
    let mut other = 0;
    for p in paths {
        let p = p.as_ref();
        let meta = std::fs::metadata(p).map_err(|source| Error::Io {
            action: "read",
            path: p.display().to_string(),
            source,
        })?;
        if meta.is_dir() {
            let mut files = Vec::new();
            scan(p, 0, &mut files, &mut other)?;
            files.sort();
            out.extend(files);
        } else {
            out.push(p.to_path_buf());
        }
    }
    Ok((out, other))
}

/// The `*.safetensors` files under `dir` (`depth` folders below the one
/// given) into `files`; below the top, files of another format only counted.
fn scan(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, other: &mut usize) -> Result<()> {
    let io = |source| Error::Io {
        action: "read",
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_dir() {
            scan(&path, depth + 1, files, other)?;
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            match format_of(&path) {
                Some(f) if depth > 0 && f != wgpu_batchnorm::fixture::FORMAT => *other += 1,
                _ => files.push(path),
            }
        }
    }
    Ok(())
}

/// The `format` metadata value of a safetensors file, when its header can
/// be read and has one.
fn format_of(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = usize::try_from(u64::from_le_bytes(len)).ok()?;
    if len > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; len];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?
        .get("format")?
        .as_str()
        .map(str::to_string)
}

/// A device that matched but could not be opened: every fixture FAILs on it.
struct Broken {
    name: String,
    error: String,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Loads `path` and runs it on every target, then fails it on every broken
/// device, handing each report to `row` as soon as it is made: one report
/// per target and broken device, or one failed report (backend `-`) when
/// the file cannot be loaded. A target that panics is a failed report.
fn check_file(
    path: &Path,
    targets: &[Box<dyn FixtureTarget>],
    broken: &[Broken],
    row: &mut dyn FnMut(FixtureReport),
) {
    let fixture = match Fixture::load(path) {
        Ok(f) => f,
        Err(e) => {
            row(FixtureReport::load_failure(
                &path.display().to_string(),
                "-",
                &e,
            ));
            return;
        }
    };
    let failed = |backend: String, why: String| FixtureReport {
        case: fixture.case.clone(),
        path: fixture.path.clone(),
        backend,
        checks: Vec::new(),
        failures: vec![why],
    };
    for target in targets {
        row(
            catch_unwind(AssertUnwindSafe(|| run_fixture(&fixture, target.as_ref())))
                .unwrap_or_else(|payload| {
                    let why = format!("panicked: {}", panic_message(payload.as_ref()));
                    failed(target.name(), why)
                }),
        );
    }
    for b in broken {
        row(failed(b.name.clone(), b.error.clone()));
    }
}

/// The report table on stdout, with the running counts.
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

/// Opens the adapters `args` selects: the ones that run this crate as
/// targets, the others as broken devices (or skipped, when they cannot run it).
fn gpu_targets(args: &CheckArgs) -> (Vec<Box<dyn FixtureTarget>>, Vec<Broken>) {
    let opened = open_adapters(&args.selection.adapter_selection(), None);
    let mut broken = Vec::new();
    for f in opened.failed {
        match f.error {
            e @ Error::Unsupported { .. } => {
                eprintln!(
                    "warning: skipping {}: it cannot run this crate ({e})",
                    f.label
                );
            }
            e => {
                eprintln!("error: cannot open {}: {e}", f.label);
                broken.push(Broken {
                    name: f.label,
                    error: format!("could not open the device: {e}"),
                });
            }
        }
    }
    let targets = opened
        .contexts
        .into_iter()
        .map(|g| Box::new(g) as Box<dyn FixtureTarget>)
        .collect();
    (targets, broken)
}

/// Runs `bnorm check`: exit status 1 when anything failed, 2 for usage and
/// I/O errors.
pub fn check(args: &CheckArgs) -> ExitCode {
    let files = match collect_fixture_files(&args.fixtures) {
        Ok((f, 0)) => f,
        Ok((f, other)) => {
            eprintln!(
                "bnorm check: {other} safetensors file(s) of another format in subfolders left out"
            );
            f
        }
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
        gpu_targets(args)
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
    targets.extend(gpus);

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
        check_file(file, &targets, &broken, &mut |r| table.row(&r));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    #[test]
    fn check_file_reports_a_malformed_file_as_one_failure() {
        let dir = std::env::temp_dir().join(format!("bnorm-fixtures-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("broken.safetensors");
        std::fs::write(&bad, b"0123456789").unwrap();
        let targets: Vec<Box<dyn FixtureTarget>> = vec![Box::new(CpuTarget)];
        let mut reports = Vec::new();
        check_file(&bad, &targets, &[], &mut |r| reports.push(r));
        assert_eq!(reports.len(), 1);
        assert!(!reports[0].passed());
        assert_eq!(reports[0].case, "broken");
        let reason = reports[0].reason().unwrap();
        assert!(
            reason.contains("broken.safetensors") && reason.contains("not a safetensors file"),
            "{reason}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn check_file_reports_every_target_and_broken_device() {
        let targets: Vec<Box<dyn FixtureTarget>> =
            vec![Box::new(CpuTarget), Box::new(CpuFastTarget)];
        let broken = [Broken {
            name: "vulkan:gone".into(),
            error: "could not open the device: lost".into(),
        }];
        let mut reports = Vec::new();
        check_file(
            &fixture_dir().join("m2.safetensors"),
            &targets,
            &broken,
            &mut |r| reports.push(r),
        );
        let rows: Vec<(&str, &str, bool)> = reports
            .iter()
            .map(|r| (r.case.as_str(), r.backend.as_str(), r.passed()))
            .collect();
        assert_eq!(
            rows,
            [
                ("m2", "cpu-reference", true),
                ("m2", "cpu", true),
                ("m2", "vulkan:gone", false)
            ]
        );
        assert_eq!(
            reports[2].reason().unwrap(),
            "could not open the device: lost"
        );
    }

    #[test]
    fn collect_scans_folders_sorted_and_errors_on_missing_paths() {
        let (files, other) = collect_fixture_files(&[fixture_dir()]).unwrap();
        let mut sorted = files.clone();
        sorted.sort();
        assert_eq!(files, sorted);
        assert!(
            files
                .iter()
                .all(|f| f.extension().unwrap() == "safetensors")
        );
        // the fused fixtures in their subfolder are in, the folding files are not
        assert!(
            files
                .iter()
                .any(|f| f.ends_with("fused/add_relu_nchw.safetensors"))
        );
        assert!(files.iter().all(|f| !f.to_string_lossy().contains("fold")));
        assert_eq!(other, 3);
        // a file given by name is taken whatever it holds
        let model = fixture_dir().join("fold/model.safetensors");
        assert_eq!(
            collect_fixture_files(&[&model]).unwrap(),
            (vec![model.clone()], 0)
        );
        let e = collect_fixture_files(&["tests/no_such_folder"]).unwrap_err();
        assert!(e.to_string().contains("tests/no_such_folder"), "{e}");
    }
}

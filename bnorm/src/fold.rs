//! `bnorm fold`: every BatchNorm of a PyTorch `state_dict` folded into the
//! convolution or linear layer before it, for inference.

use crate::EXIT_USAGE;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wgpu_batchnorm::fold::{FoldOptions, FoldedStateDict, fold_state_dict};
use wgpu_batchnorm::{Error, StateDict};

/// Arguments of `bnorm fold`.
#[derive(Debug, Args)]
pub struct FoldArgs {
    /// A safetensors file holding a PyTorch state_dict.
    #[arg(value_name = "CHECKPOINT")]
    input: PathBuf,
    /// Where to write the folded state_dict (not the input file).
    #[arg(short, long, value_name = "OUT", required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Fold BATCHNORM into LAYER (module paths, e.g. `--pair up=up_norm`),
    /// for BatchNorms the names do not pair; repeatable.
    #[arg(long, value_name = "LAYER=BATCHNORM", value_parser = parse_pair)]
    pair: Vec<(String, String)>,
    /// LAYER is a transposed convolution (weight (in, out/groups, k...)),
    /// with `:GROUPS` when grouped; repeatable. Never guessed: a square
    /// weight looks the same either way.
    #[arg(long, value_name = "LAYER[:GROUPS]", value_parser = parse_transposed)]
    transposed: Vec<(String, usize)>,
    /// Leave BATCHNORM as it is (all its keys stay); repeatable.
    #[arg(long, value_name = "BATCHNORM")]
    keep: Vec<String>,
    /// The BatchNorms' eps, which a state_dict does not store.
    #[arg(long, default_value_t = 1e-5)]
    eps: f64,
    /// Print the folds without writing anything.
    #[arg(long)]
    dry_run: bool,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((l, b)) if !l.is_empty() && !b.is_empty() => Ok((trim(l), trim(b))),
        _ => Err(format!(
            "expected LAYER=BATCHNORM (module paths, e.g. layer1.0.conv1=layer1.0.bn1), got {s:?}"
        )),
    }
}

fn parse_transposed(s: &str) -> Result<(String, usize), String> {
    let (layer, groups) = match s.rsplit_once(':') {
        Some((l, g)) => {
            let g: usize = g
                .parse()
                .map_err(|_| format!("groups in {s:?} must be a whole number"))?;
            (l, g)
        }
        None => (s, 1),
    };
    if layer.is_empty() || groups == 0 {
        return Err(format!(
            "expected LAYER or LAYER:GROUPS with GROUPS >= 1, got {s:?}"
        ));
    }
    Ok((trim(layer), groups))
}

/// A module path as written in a state_dict, without a trailing `.` or `.weight`.
fn trim(s: &str) -> String {
    let s = s.strip_suffix('.').unwrap_or(s);
    s.strip_suffix(".weight").unwrap_or(s).to_string()
}

impl FoldArgs {
    fn options(&self) -> FoldOptions {
        FoldOptions {
            eps: self.eps,
            pairs: self.pair.clone(),
            transposed: self.transposed.clone(),
            keep: self.keep.iter().map(|k| trim(k)).collect(),
        }
    }
}

/// Reads, folds and (unless `--dry-run`) writes; the report goes to `out`.
///
/// # Errors
/// The library's errors; [`Error::Io`] for a file that cannot be read or
/// written, or an output path that is the input.
fn run(args: &FoldArgs, out: &mut dyn Write) -> wgpu_batchnorm::Result<FoldedStateDict> {
    let sd = StateDict::open(&args.input)?;
    if let Some(output) = &args.output
        && same_file(&args.input, output)
    {
        return Err(Error::Io {
            action: "write",
            path: output.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it is the input file; write the folded state_dict elsewhere",
            ),
        });
    }
    let folded = fold_state_dict(&sd, &args.options())?;
    for p in &folded.pairs {
        let _ = writeln!(out, "folded {p}");
    }
    for k in &folded.kept {
        let _ = writeln!(out, "kept   {k}");
    }
    let summary = format!(
        "{} BatchNorm(s) folded, {} kept, {} keys removed",
        folded.pairs.len(),
        folded.kept.len(),
        folded.removed_keys.len()
    );
    match (&args.output, args.dry_run) {
        (Some(path), false) => {
            folded.save(path)?;
            let _ = writeln!(
                out,
                "{summary}; wrote {} ({} tensors)",
                path.display(),
                folded.tensors
            );
        }
        _ => {
            let _ = writeln!(out, "{summary}; nothing written (--dry-run)");
        }
    }
    Ok(folded)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `bnorm fold`: exit status 0, 1 when the state_dict cannot be folded
/// (nothing is written), 2 for I/O errors.
pub fn fold(args: &FoldArgs) -> ExitCode {
    match run(args, &mut std::io::stdout().lock()) {
        Ok(f) if f.pairs.is_empty() && f.kept.is_empty() => {
            eprintln!(
                "bnorm fold: note: no BatchNorm with running statistics in {}; the output is a copy",
                args.input.display()
            );
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ Error::Io { .. }) => {
            eprintln!("bnorm fold: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("bnorm fold: error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: FoldArgs,
    }

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn parse(args: &[&str]) -> FoldArgs {
        Cli::try_parse_from(std::iter::once("fold").chain(args.iter().copied()))
            .expect("arguments parse")
            .args
    }

    #[test]
    fn pair_and_transposed_arguments_parse() {
        assert_eq!(
            parse_pair("up.weight=up_norm."),
            Ok(("up".into(), "up_norm".into()))
        );
        assert!(parse_pair("up").is_err() && parse_pair("=bn").is_err());
        assert_eq!(parse_transposed("dec.up:4"), Ok(("dec.up".into(), 4)));
        assert_eq!(parse_transposed("up"), Ok(("up".into(), 1)));
        assert!(parse_transposed("up:0").is_err() && parse_transposed("up:x").is_err());
    }

    #[test]
    fn folds_the_model_and_reports_every_pair() {
        let dir = std::env::temp_dir().join(format!("bnorm-fold-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = root().join("tests/fixtures/fold/model.safetensors");
        let output = dir.join("folded.safetensors");
        let args = parse(&[
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--pair",
            "up=up_norm",
            "--transposed",
            "up",
        ]);
        let mut report = Vec::new();
        let folded = run(&args, &mut report).expect("folds");
        let report = String::from_utf8(report).unwrap();
        assert_eq!(folded.pairs.len(), 8, "{report}");
        assert!(
            report.contains(
                "folded layer1.0.bn1 -> layer1.0.conv1: convolution [4, 4, 3, 3], bias added (name)"
            ),
            "{report}"
        );
        assert!(
            report.contains("folded head.2 -> head.1: linear layer [5, 144] (Sequential index)"),
            "{report}"
        );
        assert!(
            report.contains("folded up_norm -> up: transposed convolution [6, 4, 2, 2] (given)"),
            "{report}"
        );
        let last = format!(
            "8 BatchNorm(s) folded, 0 kept, 38 keys removed; wrote {} (16 tensors)",
            output.display()
        );
        assert_eq!(report.lines().last(), Some(last.as_str()), "{report}");
        let back = StateDict::open(&output).unwrap();
        assert!(back.batchnorm_layers().is_empty());
        assert!(
            back.keys()
                .iter()
                .all(|k| !k.contains("bn") && !k.contains("up_norm"))
        );

        // Writing over the input is refused; a BatchNorm without a pair is an error naming it.
        let same = parse(&[input.to_str().unwrap(), "-o", input.to_str().unwrap()]);
        let err = run(&same, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("it is the input file"), "{err}");
        let unpaired = parse(&[input.to_str().unwrap(), "--dry-run"]);
        let err = run(&unpaired, &mut Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains("`up_norm`: no rule applies") && err.contains("--pair"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The `bnorm` command-line tool: `check`, `adapters`, `layers`, exit statuses.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::gpu_contexts;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wgpu_batchnorm::wgpu::Features;

/// The workspace root, where the fixtures and checkpoints are.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(case: &str) -> PathBuf {
    root()
        .join("tests/fixtures")
        .join(format!("{case}.safetensors"))
}

fn bnorm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnorm"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run bnorm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn last_line(o: &Output) -> String {
    stdout(o).lines().last().unwrap_or_default().to_string()
}

#[test]
fn check_cpu_only_passes_and_closes_with_the_count() {
    let (a, b) = (fixture("bn2d"), fixture("error_m1"));
    let o = bnorm(&[
        "check",
        "--cpu-only",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 5, "{out}");
    assert!(
        rows[0].starts_with("bn2d ")
            && rows[0].contains(" cpu-reference ")
            && rows[0].contains(" PASS "),
        "{out}"
    );
    assert!(
        rows[1].starts_with("bn2d ") && rows[1].contains(" cpu ") && rows[1].contains(" PASS "),
        "{out}"
    );
    assert!(
        rows[2].starts_with("error_m1 ") && rows[2].contains(" PASS "),
        "{out}"
    );
    assert_eq!(rows[4], "4 passed, 0 failed");
}

#[test]
fn check_runs_every_adapter() {
    let gpus = gpu_contexts().len();
    let f = fixture("nhwc_3d");
    let o = bnorm(&["check", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(last_line(&o), format!("{} passed, 0 failed", 2 + gpus));
    for ctx in gpu_contexts() {
        assert!(
            stdout(&o).contains(&ctx.label()),
            "{} missing:\n{}",
            ctx.label(),
            stdout(&o)
        );
    }
}

#[test]
fn check_runs_f16_on_every_backend() {
    let f = fixture("f16_bn1d");
    let o = bnorm(&["check", f.to_str().unwrap()]);
    let out = stdout(&o);
    // The reference emulates f16 storage, the fast CPU backend stores it, and
    // every adapter runs it: on f16 values with SHADER_F16, on packed words without.
    let names: Vec<String> = ["cpu-reference".to_string(), "cpu".to_string()]
        .into_iter()
        .chain(gpu_contexts().iter().map(|c| c.label()))
        .collect();
    assert_eq!(
        last_line(&o),
        format!("{} passed, 0 failed", names.len()),
        "{out}"
    );
    assert_eq!(o.status.code(), Some(0), "{out}");
    for name in &names {
        let row = out
            .lines()
            .find(|l| l.split("  ").any(|col| col.trim() == name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{out}"));
        assert!(row.contains(" PASS "), "{row}");
    }
    // the GL adapter here has no SHADER_F16: the packed kernels ran
    assert!(
        gpu_contexts().is_empty()
            || gpu_contexts()
                .iter()
                .any(|c| !c.features().contains(Features::SHADER_F16))
            || std::env::var("BNORM_EXPECT_BACKENDS").is_err(),
        "expected an adapter without SHADER_F16 among {names:?}"
    );
}

#[test]
fn malformed_file_is_a_fail_row_not_an_abort() {
    let dir = std::env::temp_dir().join(format!("bnorm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a_broken.safetensors"), b"garbage!").unwrap();
    std::fs::copy(fixture("m2"), dir.join("b_m2.safetensors")).unwrap();
    std::fs::write(dir.join("notes.txt"), b"not a fixture").unwrap();
    let o = bnorm(&["check", "--cpu-only", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert!(
        rows[0].starts_with("a_broken ") && rows[0].contains(" FAIL "),
        "{out}"
    );
    assert!(
        rows[0].contains("a_broken.safetensors: not a safetensors file"),
        "{out}"
    );
    for row in &rows[1..3] {
        assert!(row.starts_with("m2 ") && row.contains(" PASS "), "{out}");
    }
    assert_eq!(rows[3], "2 passed, 1 failed");
}

#[test]
fn usage_and_io_errors_exit_2() {
    let o = bnorm(&["check", "tests/no_such_fixture.safetensors"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no_such_fixture.safetensors"),
        "{}",
        stderr(&o)
    );

    let f = fixture("m2");
    let o = bnorm(&["check", "--backend", "directx9", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown backend \"directx9\""),
        "{}",
        stderr(&o)
    );

    let o = bnorm(&["check"]);
    assert_eq!(o.status.code(), Some(2));

    let o = bnorm(&["check", "--cpu-only", "--no-cpu", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));

    let o = bnorm(&["check", "--cpu-only", "tests/checkpoints/../common"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no fixture files"), "{}", stderr(&o));
}

#[test]
fn no_matching_adapter_is_loud_and_fails_only_when_required() {
    let f = fixture("m2");
    let args = [
        "check",
        "--adapter",
        "no-such-adapter-anywhere",
        f.to_str().unwrap(),
    ];
    let o = bnorm(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("NO GPU ADAPTER"), "{}", stderr(&o));
    assert_eq!(last_line(&o), "2 passed, 0 failed");

    let o = bnorm(&[&args[..], &["--require-gpu"]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(last_line(&o), "2 passed, 0 failed");
    assert!(stderr(&o).contains("--require-gpu"), "{}", stderr(&o));
}

#[test]
fn adapters_lists_limits_and_features() {
    let o = bnorm(&["adapters"]);
    let out = stdout(&o);
    if gpu_contexts().is_empty() {
        assert_eq!(o.status.code(), Some(1));
        return;
    }
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for ctx in gpu_contexts() {
        let info = ctx.adapter_info();
        assert!(
            out.contains(&format!("{}: {}", info.backend, info.name)),
            "{out}"
        );
    }
    for needle in [
        "compute shaders: yes",
        "max_storage_buffer_binding_size",
        "max_buffer_size",
        "max_compute_workgroup_size_x",
        "max_compute_invocations_per_workgroup",
        "max_compute_workgroups_per_dimension",
        "max_compute_workgroup_storage_size",
        "SHADER_F16",
        "SUBGROUP",
        "TIMESTAMP_QUERY",
        "driver:",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
}

#[test]
fn layers_lists_a_checkpoint() {
    let o = bnorm(&["layers", "tests/checkpoints/resnet_bn.safetensors"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert_eq!(lines[0], "bn: 8 features, affine, num_batches_tracked 5");
    assert_eq!(
        lines[7],
        "layer2.0.downsample.1: 16 features, affine, num_batches_tracked 5"
    );

    let o = bnorm(&["layers", "tests/checkpoints/resnet_bn_eval.safetensors"]);
    assert_eq!(o.status.code(), Some(1));
    let o = bnorm(&["layers", "Cargo.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("checkpoint Cargo.toml: not a safetensors file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_is_wired() {
    let o = bnorm(&["bench", "--help"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Usage: bnorm bench"), "{out}");
    assert!(out.contains("--json"), "{out}");
    let o = bnorm(&["bench", "--shape", "8xbad"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bench_hot_path_measures_every_adapter() {
    let json = std::env::temp_dir().join(format!("bnorm-hot-path-{}.json", std::process::id()));
    let o = bnorm(&[
        "bench",
        "--hot-path",
        "--shape",
        "4x8x2",
        "--layers",
        "3",
        "--repeat",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    let gpus = gpu_contexts();
    if gpus.is_empty() {
        assert_eq!(o.status.code(), Some(1), "{out}{}", stderr(&o));
        assert!(out.contains("no GPU adapter"), "{out}");
        return;
    }
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    for ctx in gpus {
        let info = ctx.adapter_info();
        let backend = info.backend.to_string();
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .filter(|cells: &Vec<&str>| {
                cells.len() == 9 && cells[2] == backend && cells[3] == info.name
            })
            .collect();
        let labels = [
            "empty submit + wait",
            "empty GpuContext::run",
            "record train fwd + backward",
            "record ... + encoder.finish()",
            "3 train fwd: recording",
            "3 train fwd: finish",
            "3 train fwd: submit",
            "3 train fwd: wait",
            "3 train fwd: one submit",
            "3 train fwd: 3 blocking",
        ];
        let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
        assert_eq!(names, labels, "{}:\n{out}", ctx.label());
        for row in &rows[2..] {
            assert_eq!(row[1], "4x8x2", "{row:?}");
        }
        // After the first call, recording creates no buffer and no bind group.
        for row in [&rows[2], &rows[8], &rows[9]] {
            assert_eq!(row[7..], ["0", "0"], "{row:?}");
        }
        assert!(
            out.contains(&format!(
                "{} 4x8x2: 3 training forwards in one submission ",
                ctx.label()
            )),
            "{out}"
        );
    }
    assert!(
        out.contains("x the floor (one empty submit + wait, "),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let records = v["hot_path"].as_array().unwrap();
    assert_eq!(records.len(), 10 * gpus.len(), "{v}");
    for r in records {
        assert!(r["median_s"].as_f64().unwrap() > 0.0, "{r}");
        if let Some(after) = r.get("resources_after") {
            assert_eq!(after, &r["resources_before"], "{r}");
        }
    }

    let o = bnorm(&["bench", "--hot-path", "--backend", "cpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--backend cpu"), "{}", stderr(&o));
    let o = bnorm(&["bench", "--layers", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--hot-path"), "{}", stderr(&o));
}

#[test]
fn bench_fused_sets_each_fused_op_against_its_unfused_twin() {
    let json = std::env::temp_dir().join(format!("bnorm-fused-{}.json", std::process::id()));
    let o = bnorm(&[
        "bench",
        "--op",
        "fused",
        "--fusion",
        "add_relu",
        "--shape",
        "4x8x4x4",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("vs unfused"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let records = v.as_array().unwrap();
    // the CPU (one time source) and every adapter (timestamps where it has them, wall)
    let sources: usize = 1 + gpu_contexts()
        .iter()
        .map(|c| 1 + usize::from(c.has_timestamps()))
        .sum::<usize>();
    assert_eq!(records.len(), 2 * 3 * sources, "{v}");
    for op in ["train_forward", "eval_forward", "backward"] {
        let fused: Vec<_> = records
            .iter()
            .filter(|r| r["op"] == format!("fused_{op}"))
            .collect();
        assert_eq!(fused.len(), sources, "{op}: {v}");
        for r in fused {
            assert_eq!(r["fusion"], "add_relu", "{r}");
            assert!(r["fused_speedup"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    // floors: training forward with the residual 16 B per f32 element, backward with ReLU 28 B
    let r = records
        .iter()
        .find(|r| r["op"] == "unfused_backward")
        .unwrap();
    let want = 4.0 * 8.0 * 16.0 * 28.0 / r["median_s"].as_f64().unwrap() / 1e9;
    assert!(
        (r["gbps"].as_f64().unwrap() / want - 1.0).abs() < 1e-9,
        "{r}"
    );

    let o = bnorm(&["bench", "--op", "fused", "--fusion", "none"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a fusion"), "{}", stderr(&o));
}

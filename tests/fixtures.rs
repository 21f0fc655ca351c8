//! PyTorch parity fixtures (tests/fixtures, format shared/FIXTURES.md; the
//! fused BatchNorm's in tests/fixtures/fused) on the CPU reference, the fast
//! CPU backend and every GPU adapter, and the fixture reader's errors.

mod common;

use common::gpu_contexts;
use ndarray::ArrayD;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use wgpu_batchnorm::fixture::{CpuFastTarget, CpuTarget, Fixture, FixtureTarget, run_fixture};
use wgpu_batchnorm::{
    Activation, BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference, DType, Error,
    FusedGradients, Fusion, Gradients, Mode, SavedStats,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture_path(case: &str) -> PathBuf {
    fixture_dir().join(format!("{case}.safetensors"))
}

fn fused_path(case: &str) -> PathBuf {
    fixture_dir().join(format!("fused/{case}.safetensors"))
}

/// The committed fixture files of `dir`, in name order.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The committed fixture files: the plain ones, then the fused ones.
fn fixture_files() -> Vec<PathBuf> {
    let mut files = files_in(&fixture_dir());
    files.extend(files_in(&fixture_dir().join("fused")));
    files
}

/// The CPU reference, the fast CPU backend and every GPU adapter.
fn targets() -> Vec<Box<dyn FixtureTarget>> {
    let mut t: Vec<Box<dyn FixtureTarget>> = vec![Box::new(CpuTarget), Box::new(CpuFastTarget)];
    for ctx in gpu_contexts() {
        t.push(Box::new(ctx.clone()));
    }
    t
}

/// Whether the target's layers take f16 storage.
fn stores_f16(target: &dyn FixtureTarget) -> bool {
    let mut bn = target.open(&BatchNormConfig::new(2)).unwrap();
    bn.set_storage_dtype(DType::F16).is_ok()
}

#[test]
fn every_fixture_on_every_backend() {
    let files = fixture_files();
    assert!(
        files.len() >= 33 + 15,
        "expected the 33 committed fixtures in {} and the 15 in fused/, found {}",
        fixture_dir().display(),
        files.len()
    );
    let targets = targets();
    let mut problems = Vec::new();
    let (mut passed, mut rows) = (0, 0);
    for file in &files {
        let fixture = Fixture::load(file).unwrap_or_else(|e| panic!("{e}"));
        for target in &targets {
            let r = run_fixture(&fixture, target.as_ref());
            rows += 1;
            println!("{r}");
            let reason = r.reason().unwrap_or_default();
            if fixture.dtype == DType::F16 && !stores_f16(target.as_ref()) {
                // A backend without f16 storage must fail the row, and say why.
                if r.failures.len() != 1
                    || !reason.starts_with("f16 storage is not supported by this backend")
                {
                    problems.push(format!(
                        "{r}\n    expected a FAIL saying f16 storage is not supported"
                    ));
                }
            } else if !r.passed() {
                problems.push(r.to_string());
            } else {
                passed += 1;
                if r.checks.is_empty() {
                    problems.push(format!(
                        "{} on {}: PASS without comparing anything",
                        r.case, r.backend
                    ));
                }
            }
        }
    }
    println!("{passed} of {rows} rows passed outright");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn cpu_reference_passes_the_f16_fixtures_at_f16_tolerance() {
    for case in [
        "f16_bn2d",
        "f16_nhwc_2d",
        "f16_large_mean",
        "f16_no_tracking",
    ] {
        let f = Fixture::load(fixture_path(case)).unwrap();
        assert_eq!(f.dtype, DType::F16);
        let r = run_fixture(&f, &CpuTarget);
        assert!(r.passed(), "{r}");
        let y = r.checks.iter().find(|c| c.name == "y").expect("y compared");
        assert_eq!(y.tolerance.atol, 5e-3, "{case}: y takes the f16 tolerance");
        let dw = r
            .checks
            .iter()
            .find(|c| c.name == "save_mean")
            .expect("save_mean compared");
        assert_eq!(
            dw.tolerance.atol, 1e-4,
            "{case}: per-channel tensors take the f32 tolerance"
        );
    }
}

#[test]
fn fused_fixtures_pass_on_both_cpu_backends() {
    let files = files_in(&fixture_dir().join("fused"));
    assert_eq!(files.len(), 15, "the committed fused fixtures");
    let mut fusions = std::collections::BTreeSet::new();
    for file in &files {
        let f = Fixture::load(file).unwrap_or_else(|e| panic!("{e}"));
        let fusion = f
            .fusion
            .expect("a fused fixture has `activation` and `residual`");
        fusions.insert(fusion.name());
        for target in [&CpuTarget as &dyn FixtureTarget, &CpuFastTarget] {
            let r = run_fixture(&f, target);
            println!("{r}");
            assert!(r.passed(), "{r}");
            let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
            for want in ["y", "dx", "save_mean"] {
                assert!(names.contains(&want), "{}: {want} not compared", r.case);
            }
            assert_eq!(
                names.contains(&"dz"),
                fusion.residual,
                "{}: dz compared exactly with a residual",
                r.case
            );
            if f.config.track_running_stats {
                assert!(names.contains(&"y_eval") && names.contains(&"dx_eval"));
                assert_eq!(names.contains(&"dz_eval"), fusion.residual, "{}", r.case);
            }
            let dx = r.checks.iter().find(|c| c.name == "dx").unwrap();
            assert_eq!(dx.tolerance, f.tolerance("dx"));
        }
    }
    assert_eq!(
        fusions.len(),
        Fusion::ALL.len(),
        "every fusion: {fusions:?}"
    );
}

#[test]
fn error_fixture_passes_when_training_is_refused_and_eval_matches() {
    let f = Fixture::load(fixture_path("error_m1")).unwrap();
    assert!(f.expect_error);
    let r = run_fixture(&f, &CpuTarget);
    assert!(r.passed(), "{r}");
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["y_eval", "dx_eval", "dweight_eval", "dbias_eval"]);
}

/// A CPU reference that lies in one way, to prove the runner catches it.
struct Liar {
    inner: CpuReference,
    lie: Lie,
}

#[derive(Clone, Copy)]
enum Lie {
    /// Adds 1e-3 to one element of `y`.
    NudgeY,
    /// Accepts one value per channel (returns x) and bumps the counter.
    AcceptSingleValue,
    /// Forgets the counter increment.
    FrozenCounter,
    /// Returns NaN in dweight.
    NanDweight,
    /// Fused ops: ignores the activation of the forward.
    ForwardWithoutRelu,
    /// Fused ops: the backward ignores the ReLU's mask.
    BackwardWithoutMask,
    /// Fused ops: returns no dz.
    NoDz,
    /// Fused ops: refused, as the trait's default does.
    Unfused,
}

impl BatchNormBackend for Liar {
    fn backend_name(&self) -> String {
        "liar".into()
    }
    fn config(&self) -> &BatchNormConfig {
        self.inner.config()
    }
    fn forward_train(
        &mut self,
        x: ndarray::ArrayViewD<'_, f32>,
    ) -> wgpu_batchnorm::Result<ArrayD<f32>> {
        match self.lie {
            Lie::AcceptSingleValue if x.len() == self.inner.config().num_features => {
                let mut s = self.inner.state()?;
                s.num_batches_tracked = s.num_batches_tracked.map(|n| n + 1);
                self.inner.set_state(&s)?;
                Ok(x.to_owned())
            }
            Lie::FrozenCounter => {
                let before = self.inner.state()?.num_batches_tracked;
                let y = self.inner.forward_train(x)?;
                let mut s = self.inner.state()?;
                s.num_batches_tracked = before;
                self.inner.set_state(&s)?;
                Ok(y)
            }
            Lie::NudgeY => {
                let mut y = self.inner.forward_train(x)?;
                if let Some(v) = y.iter_mut().nth(7) {
                    *v += 1e-3;
                }
                Ok(y)
            }
            _ => self.inner.forward_train(x),
        }
    }
    fn forward_eval(
        &mut self,
        x: ndarray::ArrayViewD<'_, f32>,
    ) -> wgpu_batchnorm::Result<ArrayD<f32>> {
        self.inner.forward_eval(x)
    }
    fn backward(
        &mut self,
        x: ndarray::ArrayViewD<'_, f32>,
        dy: ndarray::ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> wgpu_batchnorm::Result<Gradients> {
        let mut g = self.inner.backward(x, dy, mode)?;
        if let (Lie::NanDweight, Some(dw)) = (self.lie, g.dweight.as_mut()) {
            dw[0] = f32::NAN;
        }
        Ok(g)
    }
    fn forward_fused(
        &mut self,
        x: ndarray::ArrayViewD<'_, f32>,
        z: Option<ndarray::ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> wgpu_batchnorm::Result<ArrayD<f32>> {
        match self.lie {
            Lie::Unfused => Err(Error::Unsupported {
                adapter: "liar".into(),
                what: "fused BatchNorm".into(),
            }),
            Lie::ForwardWithoutRelu => self.inner.forward_fused(x, z, Activation::Identity, mode),
            _ => self.inner.forward_fused(x, z, activation, mode),
        }
    }
    fn backward_fused(
        &mut self,
        x: ndarray::ArrayViewD<'_, f32>,
        y: ndarray::ArrayViewD<'_, f32>,
        dy: ndarray::ArrayViewD<'_, f32>,
        fusion: Fusion,
        mode: Mode,
    ) -> wgpu_batchnorm::Result<FusedGradients> {
        match self.lie {
            Lie::BackwardWithoutMask => {
                let f = Fusion::new(fusion.residual, Activation::Identity);
                self.inner.backward_fused(x, y, dy, f, mode)
            }
            Lie::NoDz => {
                let g = self.inner.backward_fused(x, y, dy, fusion, mode)?;
                Ok(FusedGradients { dz: None, ..g })
            }
            _ => self.inner.backward_fused(x, y, dy, fusion, mode),
        }
    }
    fn saved_stats(&self) -> wgpu_batchnorm::Result<Option<SavedStats>> {
        self.inner.saved_stats()
    }
    fn state(&self) -> wgpu_batchnorm::Result<BatchNormState> {
        self.inner.state()
    }
    fn set_state(&mut self, state: &BatchNormState) -> wgpu_batchnorm::Result<()> {
        self.inner.set_state(state)
    }
}

struct LiarTarget(Lie);

impl FixtureTarget for LiarTarget {
    fn name(&self) -> String {
        "liar".into()
    }
    fn open(&self, config: &BatchNormConfig) -> wgpu_batchnorm::Result<Box<dyn BatchNormBackend>> {
        Ok(Box::new(Liar {
            inner: CpuReference::new(config.clone())?,
            lie: self.0,
        }))
    }
}

#[test]
fn runner_catches_wrong_outputs() {
    let bn2d = Fixture::load(fixture_path("bn2d")).unwrap();

    let r = run_fixture(&bn2d, &LiarTarget(Lie::NudgeY));
    assert!(!r.passed());
    let reason = r.reason().unwrap();
    assert!(
        reason.starts_with("y: 1 of 1512 elements out of tolerance"),
        "{reason}"
    );
    assert!(reason.contains("worst at [0, 0, 0, 7]"), "{reason}");
    assert_eq!(r.worst().unwrap().name, "y");
    assert!((r.worst().unwrap().max_abs_error - 1e-3).abs() < 1e-5);

    let r = run_fixture(&bn2d, &LiarTarget(Lie::FrozenCounter));
    assert_eq!(
        r.failures,
        ["num_batches_tracked after training is Some(0), expected 1"],
        "{r}"
    );

    let r = run_fixture(&bn2d, &LiarTarget(Lie::NanDweight));
    assert!(!r.passed());
    assert!(
        r.reason().unwrap().starts_with("dweight: 1 of 6 elements"),
        "{r}"
    );
    assert!(r.worst().unwrap().ratio.is_infinite());

    let err = Fixture::load(fixture_path("error_m1")).unwrap();
    let r = run_fixture(&err, &LiarTarget(Lie::AcceptSingleValue));
    assert!(!r.passed());
    let reason = r.reason().unwrap();
    assert!(
        reason.contains("expected forward_train to be refused"),
        "{reason}"
    );
    assert!(
        reason.contains("changed the state (num_batches_tracked Some(0) -> Some(1))"),
        "{reason}"
    );

    // f16 on a backend without f16 storage (the trait's default): a FAIL that
    // says so, never a skip.
    let f16 = Fixture::load(fixture_path("f16_bn1d")).unwrap();
    let r = run_fixture(&f16, &LiarTarget(Lie::NudgeY));
    assert_eq!(
        r.failures,
        [
            "f16 storage is not supported by this backend: unsupported on adapter \"liar\": f16 storage"
        ]
    );
}

#[test]
fn runner_catches_wrong_fused_outputs() {
    let f = Fixture::load(fused_path("add_relu_nchw")).unwrap();
    assert_eq!(f.fusion, Some(Fusion::new(true, Activation::Relu)));
    assert!(run_fixture(&f, &LiarTarget(Lie::NudgeY)).passed());

    // A backend without the fused ops fails every phase, saying why: what a
    // GPU backend reports until it implements them.
    let r = run_fixture(&f, &LiarTarget(Lie::Unfused));
    assert_eq!(
        r.failures,
        [
            "forward_fused (train) failed: unsupported on adapter \"liar\": fused BatchNorm",
            "forward_fused (eval) failed: unsupported on adapter \"liar\": fused BatchNorm",
        ]
    );

    let r = run_fixture(&f, &LiarTarget(Lie::ForwardWithoutRelu));
    let reason = r.reason().unwrap();
    assert!(reason.starts_with("y: "), "{reason}");
    assert!(reason.contains("y_eval: "), "{reason}");
    // The backward takes the fixture's y, so only the forward is wrong.
    assert!(!reason.contains("dx"), "{reason}");

    let r = run_fixture(&f, &LiarTarget(Lie::BackwardWithoutMask));
    let failed: Vec<&str> = r
        .failures
        .iter()
        .map(|s| s.split(':').next().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            "dx",
            "dz",
            "dweight",
            "dbias",
            "dx_eval",
            "dz_eval",
            "dweight_eval",
            "dbias_eval"
        ],
        "{r}"
    );

    let r = run_fixture(&f, &LiarTarget(Lie::NoDz));
    assert_eq!(
        r.failures,
        [
            "dz: the backend returned none, but the fixture expects it",
            "dz_eval: the backend returned none, but the fixture expects it",
        ]
    );
}

#[test]
fn nan_fixture_keeps_the_nan_in_its_channel() {
    let f = Fixture::load(fused_path("add_relu_nan_channel")).unwrap();
    let y = f.tensor("y").unwrap();
    // (2, 3, 4, 5): channel 1 is NaN, the others are not.
    for (i, v) in y.data.iter().enumerate() {
        assert_eq!(v.is_nan(), (i / 20) % 3 == 1, "y[{i}] = {v}");
    }
    // The ReLU lets the gradient through where y is NaN: dz = dy there.
    let (dz, dy) = (f.tensor("dz").unwrap(), f.tensor("dy").unwrap());
    for i in (0..120).filter(|i| (i / 20) % 3 == 1) {
        assert_eq!(dz.data[i], dy.data[i]);
    }
    for target in [&CpuTarget as &dyn FixtureTarget, &CpuFastTarget] {
        assert!(run_fixture(&f, target).passed());
    }
}

// ---- malformed files -------------------------------------------------------

/// The tensors and metadata of a fixture, to edit and write back.
struct Parts {
    meta: HashMap<String, String>,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

fn parts(case: &str) -> Parts {
    parts_of(&fixture_path(case))
}

fn parts_of(path: &Path) -> Parts {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    Parts {
        meta: header.metadata().clone().unwrap(),
        tensors: st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect(),
    }
}

impl Parts {
    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, Some(self.meta.clone())).unwrap()
    }

    fn error(&self) -> String {
        match Fixture::from_bytes(&self.bytes(), "edited.safetensors") {
            Ok(_) => panic!("the edited fixture was accepted"),
            Err(e @ Error::Fixture { .. }) => e.to_string(),
            Err(e) => panic!("expected Error::Fixture, got {e:?}"),
        }
    }
}

#[test]
fn unedited_parts_round_trip() {
    let p = parts("bn2d");
    let f = Fixture::from_bytes(&p.bytes(), "bn2d copy").unwrap();
    assert_eq!(f.case, "bn2d");
    assert_eq!(f.config.num_features, 6);
    assert_eq!(f.tensors.len(), 18);
}

#[test]
fn not_a_safetensors_file() {
    let e = Fixture::from_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
        "junk.bin",
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("fixture junk.bin: not a safetensors file"),
        "{msg}"
    );

    let full = std::fs::read(fixture_path("m2")).unwrap();
    let e = Fixture::from_bytes(&full[..full.len() - 3], "m2 truncated").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("fixture m2 truncated: not a safetensors file"),
        "{e}"
    );
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let e = Fixture::load("tests/fixtures/does_not_exist.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("does_not_exist.safetensors"), "{e}");
}

#[test]
fn missing_or_wrong_metadata() {
    let mut p = parts("bn2d");
    p.meta.remove("eps");
    assert_eq!(
        p.error(),
        "fixture edited.safetensors: metadata key `eps` is missing"
    );

    let mut p = parts("bn2d");
    p.meta.insert("format".into(), "batchnorm-fixture/2".into());
    assert!(p.error().contains(
        "metadata `format` is \"batchnorm-fixture/2\", expected \"batchnorm-fixture/1\""
    ));

    let mut p = parts("bn2d");
    p.meta.insert("layout".into(), "NWCH".into());
    assert!(p.error().contains("metadata `layout` is \"NWCH\""));

    let mut p = parts("bn2d");
    p.meta.insert("momentum".into(), "fast".into());
    assert!(
        p.error()
            .contains("metadata `momentum` is \"fast\", expected a decimal number or \"none\"")
    );

    let mut p = parts("bn2d");
    p.meta.insert("momentum".into(), "1.5".into());
    assert!(
        p.error().contains("momentum must lie in [0, 1]"),
        "{}",
        p.error()
    );

    let mut p = parts("bn2d");
    p.meta.insert("affine".into(), "yes".into());
    assert!(
        p.error()
            .contains("metadata `affine` is \"yes\", expected \"true\" or \"false\"")
    );

    let mut p = parts("bn2d");
    p.meta.insert("dtype".into(), "bf16".into());
    assert!(p.error().contains("metadata `dtype` is \"bf16\""));

    let mut p = parts("bn2d");
    p.meta.insert("num_batches_tracked".into(), "-1".into());
    assert!(
        p.error()
            .contains("`num_batches_tracked` is \"-1\", expected a non-negative integer")
    );

    let mut p = parts("bn2d");
    p.meta.insert("expect".into(), "success".into());
    assert!(p.error().contains("metadata `expect` is \"success\""));
}

#[test]
fn missing_tensors_wrong_dtypes_and_shapes() {
    let mut p = parts("bn2d");
    p.tensors.remove("x");
    assert_eq!(
        p.error(),
        "fixture edited.safetensors: input tensor `x` is missing"
    );

    let mut p = parts("bn2d");
    p.tensors.remove("dy");
    assert!(p.error().ends_with("input tensor `dy` is missing"));

    let mut p = parts("bn2d");
    p.tensors.remove("weight");
    assert!(
        p.error()
            .ends_with("input tensor `weight` is missing but metadata says affine = true")
    );

    let mut p = parts("bn2d");
    p.meta.insert("track_running_stats".into(), "false".into());
    assert!(p.error().ends_with(
        "tensor `running_mean` is present but metadata says track_running_stats = false"
    ));

    // x as F64: the same bytes hold half as many elements.
    let mut p = parts("bn2d");
    let x = p.tensors.get_mut("x").unwrap();
    x.0 = Dtype::F64;
    x.1 = vec![2, 6, 7, 9];
    assert!(
        p.error().ends_with(
            "tensor `x` has dtype F64, expected F32 (the fixture's storage dtype is f32)"
        )
    );

    let mut p = parts("bn2d");
    let w = p.tensors.get_mut("weight").unwrap();
    w.1 = vec![3, 2];
    assert!(p.error().ends_with(
        "tensor `weight` has shape [3, 2], expected [6] (one value per channel of `x` [4, 6, 7, 9], layout NCHW)"
    ));

    let mut p = parts("bn2d");
    let y = p.tensors.get_mut("y").unwrap();
    y.1 = vec![4, 6, 9, 7];
    assert!(
        p.error()
            .ends_with("tensor `y` has shape [4, 6, 9, 7], expected the shape of `x` [4, 6, 7, 9]")
    );

    let mut p = parts("bn2d");
    let m = p.tensors.get_mut("save_mean").unwrap();
    m.0 = Dtype::I32;
    assert!(p.error().ends_with(
        "tensor `save_mean` has dtype I32, expected F32 (per-channel tensors are always F32)"
    ));

    // An f16 fixture whose dy is f32.
    let mut p = parts("f16_bn1d");
    let dy = p.tensors.get_mut("dy").unwrap();
    dy.0 = Dtype::F32;
    dy.1 = vec![16, 8];
    assert!(
        p.error().ends_with(
            "tensor `dy` has dtype F32, expected F16 (the fixture's storage dtype is f16)"
        )
    );

    // A rank the layout cannot take.
    let mut p = parts("bn2d");
    let x = p.tensors.get_mut("x").unwrap();
    x.1 = vec![1512];
    assert!(
        p.error().contains("input `x` does not fit layout NCHW"),
        "{}",
        p.error()
    );
}

#[test]
fn wrong_fused_metadata_and_tensors() {
    let fused = || parts_of(&fused_path("add_relu_nchw"));
    let f = Fixture::from_bytes(&fused().bytes(), "copy").unwrap();
    assert_eq!(f.fusion, Some(Fusion::new(true, Activation::Relu)));

    let mut p = fused();
    p.meta.insert("activation".into(), "gelu".into());
    assert!(
        p.error()
            .ends_with("metadata `activation` is \"gelu\", expected \"identity\" or \"relu\""),
        "{}",
        p.error()
    );

    let mut p = fused();
    p.meta.insert("residual".into(), "maybe".into());
    assert!(
        p.error()
            .ends_with("metadata `residual` is \"maybe\", expected \"true\" or \"false\"")
    );

    let mut p = fused();
    p.tensors.remove("z");
    assert!(
        p.error()
            .ends_with("input tensor `z` is missing but metadata says residual = true")
    );

    let mut p = fused();
    p.meta.insert("residual".into(), "false".into());
    assert!(
        p.error()
            .ends_with("tensor `z` is present but metadata says residual = false")
    );

    let mut p = fused();
    p.meta.insert("residual".into(), "false".into());
    p.tensors.remove("z");
    assert!(p.error().ends_with(
        "tensor `dz` is present but the fixture has no residual (metadata `residual` is not true)"
    ));

    // z in another dtype or shape than x.
    let mut p = fused();
    let z = p.tensors.get_mut("z").unwrap();
    z.1 = vec![2, 3, 5, 4];
    assert!(
        p.error()
            .ends_with("tensor `z` has shape [2, 3, 5, 4], expected the shape of `x` [2, 3, 4, 5]")
    );

    // One key alone: the other takes its default.
    let mut p = parts("bn2d");
    p.meta.insert("activation".into(), "relu".into());
    let f = Fixture::from_bytes(&p.bytes(), "relu only").unwrap();
    assert_eq!(f.fusion, Some(Fusion::new(false, Activation::Relu)));
    // Run as fused, a plain fixture's expected values are wrong.
    assert!(!run_fixture(&f, &CpuTarget).passed());
}

#[test]
fn unknown_keys_are_ignored() {
    let mut p = parts("m2");
    p.meta.insert("comment".into(), "made by hand".into());
    p.tensors
        .insert("extra".into(), (Dtype::I64, vec![1], vec![0; 8]));
    let f = Fixture::from_bytes(&p.bytes(), "extra").unwrap();
    assert!(f.tensor("extra").is_none());
    assert!(run_fixture(&f, &CpuTarget).passed());
}

#[test]
fn missing_expected_tensors_are_skipped() {
    let mut p = parts("m2");
    p.tensors.remove("dx");
    p.tensors.remove("y_eval");
    let f = Fixture::from_bytes(&p.bytes(), "fewer").unwrap();
    let r = run_fixture(&f, &CpuTarget);
    assert!(r.passed(), "{r}");
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert!(
        !names.contains(&"dx") && !names.contains(&"y_eval"),
        "{names:?}"
    );
    assert!(
        names.contains(&"y") && names.contains(&"dx_eval"),
        "{names:?}"
    );
}

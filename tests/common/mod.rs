//! Shared by the integration tests: backends, data, and `all_close`.
#![allow(dead_code)]

use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use std::sync::OnceLock;
use wgpu_batchnorm::{
    AdapterSelection, BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference,
    GpuBatchNorm, GpuContext,
};

/// f32 tolerance of shared/FIXTURES.md.
pub const TOL: f32 = 1e-4;

/// The name of a dispatch's kernel without its storage suffix (`_f16`,
/// `_f16_packed`) and, for the single passes, without `_subgroup` (how
/// they merge: `single_pass.rs`, `subgroup_merges_match_workgroup_memory`).
pub fn kernel_name(kernel: &str) -> &str {
    let k = kernel.strip_suffix("_f16_packed").unwrap_or(kernel);
    let k = k.strip_suffix("_f16").unwrap_or(k);
    k.strip_suffix("_subgroup").unwrap_or(k)
}

/// Whether a missing adapter must fail the test (CI, or BNORM_REQUIRE_GPU=1).
pub fn gpu_required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("BNORM_REQUIRE_GPU")
}

/// Whether `ctx` is a CPU adapter on Vulkan (Mesa's lavapipe), where the
/// library takes the single passes and the packed f16 kernels by default.
pub fn is_lavapipe(ctx: &GpuContext) -> bool {
    use wgpu_batchnorm::wgpu::{Backend, DeviceType};
    let info = ctx.adapter_info();
    info.device_type == DeviceType::Cpu && info.backend == Backend::Vulkan
}

/// Every adapter wgpu finds (once per test binary). Without one, the test
/// fails when a GPU is required and says SKIPPED loudly otherwise.
pub fn gpu_contexts() -> &'static [GpuContext] {
    static CONTEXTS: OnceLock<Vec<GpuContext>> = OnceLock::new();
    CONTEXTS.get_or_init(|| match GpuContext::all(&AdapterSelection::from_env()) {
        Ok(c) => c,
        Err(e) if gpu_required() => {
            panic!("a GPU adapter is required (CI or BNORM_REQUIRE_GPU) but: {e}")
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED GPU backends: {e} ***\n");
            Vec::new()
        }
    })
}

/// The CPU reference and one GPU layer per adapter, all with `config` and `state`.
pub fn backends(
    config: &BatchNormConfig,
    state: &BatchNormState,
) -> Vec<Box<dyn BatchNormBackend>> {
    let mut out: Vec<Box<dyn BatchNormBackend>> =
        vec![Box::new(CpuReference::new(config.clone()).unwrap())];
    for ctx in gpu_contexts() {
        out.push(Box::new(GpuBatchNorm::new(ctx, config.clone()).unwrap()));
    }
    for b in &mut out {
        b.set_state(state).unwrap();
    }
    out
}

/// Elementwise `|got - want| <= atol + rtol * |want|`, NaN matching only NaN.
/// The error names the count of bad elements and the worst one.
pub fn all_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    atol: f32,
    rtol: f32,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} vs expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut bad = 0;
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() || g.is_nan() {
            w.is_nan() && g.is_nan()
        } else if g == w {
            true // equal infinities too, where `g - w` is NaN
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        if !ok {
            bad += 1;
            let excess = if (g - w).is_nan() {
                f32::INFINITY
            } else {
                (g - w).abs() - rtol * w.abs()
            };
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "{what}: {bad} of {} elements out of tolerance (atol {atol}, rtol {rtol}); worst at flat index {i}: got {}, want {}",
            got.len(),
            got[i],
            want[i]
        )),
    }
}

/// Fresh normal data `mean + std * N(0,1)` of shape `dims`.
pub fn normal(rng: &mut StdRng, dims: &[usize], mean: f32, std: f32) -> ArrayD<f32> {
    let d = Normal::new(mean, std).unwrap();
    ArrayD::from_shape_simple_fn(IxDyn(dims), || d.sample(rng))
}

/// A non-trivial state: weights around 1 (some negative), biases, running statistics.
pub fn random_state(rng: &mut StdRng, config: &BatchNormConfig, nbt: u64) -> BatchNormState {
    let c = config.num_features;
    let u = |rng: &mut StdRng, lo: f32, hi: f32| -> Vec<f32> {
        let d = Uniform::new(lo, hi).unwrap();
        (0..c).map(|_| d.sample(rng)).collect()
    };
    let mut w = u(rng, 0.5, 1.5);
    if c > 1 {
        w[c - 1] = -w[c - 1];
    }
    let b = u(rng, -0.5, 0.5);
    let rm = u(rng, -0.5, 0.5);
    let rv = u(rng, 0.5, 2.0);
    let mut s = BatchNormState::new(config);
    if config.affine {
        s.weight = Some(w);
        s.bias = Some(b);
    }
    if config.track_running_stats {
        s.running_mean = Some(rm);
        s.running_var = Some(rv);
        s.num_batches_tracked = Some(nbt);
    }
    s
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn flat(a: &ArrayD<f32>) -> Vec<f32> {
    a.iter().copied().collect()
}

/// Like [`backends`], with the GPU reductions cut into slices of `slice_len`
/// elements so that small tensors exercise the multi-slice merge.
pub fn backends_sliced(
    config: &BatchNormConfig,
    state: &BatchNormState,
    slice_len: Option<u32>,
) -> Vec<Box<dyn BatchNormBackend>> {
    backends_tuned(config, state, slice_len, None)
}

/// Like [`backends_sliced`], with dispatches capped at `max_per_dim` workgroups
/// per grid dimension so they fold onto a 2-D grid.
pub fn backends_tuned(
    config: &BatchNormConfig,
    state: &BatchNormState,
    slice_len: Option<u32>,
    max_per_dim: Option<u32>,
) -> Vec<Box<dyn BatchNormBackend>> {
    backends_with(config, state, &|bn| {
        bn.set_slice_len(slice_len).unwrap();
        bn.set_max_workgroups_per_dim(max_per_dim).unwrap();
    })
}

/// The CPU reference and a layer on every adapter, each layer set up by `tune`.
pub fn backends_with(
    config: &BatchNormConfig,
    state: &BatchNormState,
    tune: &dyn Fn(&mut GpuBatchNorm),
) -> Vec<Box<dyn BatchNormBackend>> {
    let mut out: Vec<Box<dyn BatchNormBackend>> =
        vec![Box::new(CpuReference::new(config.clone()).unwrap())];
    for ctx in gpu_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        tune(&mut bn);
        out.push(Box::new(bn));
    }
    for b in &mut out {
        b.set_state(state).unwrap();
    }
    out
}

/// Everything one backend computes for one input: two training steps (so the
/// running statistics accumulate), backward in both modes, evaluation.
#[derive(Debug)]
pub struct Outputs {
    pub name: String,
    pub tensors: Vec<(String, Vec<f32>)>,
    pub nbt: Option<u64>,
}

pub fn run_all(b: &mut dyn BatchNormBackend, x: &ArrayD<f32>, dy: &ArrayD<f32>) -> Outputs {
    use wgpu_batchnorm::Mode;
    let name = b.backend_name();
    let mut t: Vec<(String, Vec<f32>)> = Vec::new();
    let mut push = |k: &str, v: Vec<f32>| t.push((k.to_string(), v));
    // evaluation first, with the initial running statistics
    push("y_eval", flat(&b.forward_eval(x.view()).unwrap()));
    let ge = b.backward(x.view(), dy.view(), Mode::Eval).unwrap();
    push("dx_eval", flat(&ge.dx));
    if let (Some(w), Some(bb)) = (ge.dweight, ge.dbias) {
        push("dweight_eval", w);
        push("dbias_eval", bb);
    }
    let y = b.forward_train(x.view()).unwrap();
    push("y", flat(&y));
    let saved = b.saved_stats().unwrap().expect("saved after forward_train");
    push("save_mean", saved.mean);
    push("save_invstd", saved.invstd);
    let g = b.backward(x.view(), dy.view(), Mode::Train).unwrap();
    push("dx", flat(&g.dx));
    if let (Some(w), Some(bb)) = (g.dweight, g.dbias) {
        push("dweight", w);
        push("dbias", bb);
    }
    // second step on a shifted input: running statistics accumulate
    let x2 = x.mapv(|v| 0.5 * v + 1.0);
    push("y_step2", flat(&b.forward_train(x2.view()).unwrap()));
    let s = b.state().unwrap();
    if let (Some(rm), Some(rv)) = (s.running_mean, s.running_var) {
        push("running_mean", rm);
        push("running_var", rv);
    }
    push("y_eval_after", flat(&b.forward_eval(x.view()).unwrap()));
    Outputs {
        name,
        tensors: t,
        nbt: s.num_batches_tracked,
    }
}

/// Runs `x`, `dy` on the CPU reference and every GPU, and compares each GPU with
/// the reference at the f32 tolerance. Returns the number of GPU backends checked.
pub fn check_parity(
    case: &str,
    config: &BatchNormConfig,
    state: &BatchNormState,
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
    slice_len: Option<u32>,
) -> usize {
    check_parity_tuned(case, config, state, x, dy, slice_len, None)
}

/// [`check_parity`] with dispatches capped at `max_per_dim` workgroups per dimension.
pub fn check_parity_tuned(
    case: &str,
    config: &BatchNormConfig,
    state: &BatchNormState,
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
    slice_len: Option<u32>,
    max_per_dim: Option<u32>,
) -> usize {
    check_parity_with(case, config, state, x, dy, &|bn| {
        bn.set_slice_len(slice_len).unwrap();
        bn.set_max_workgroups_per_dim(max_per_dim).unwrap();
    })
}

/// [`check_parity`] with every GPU layer set up by `tune`: each adapter's
/// layer twice, the second with its training forwards in passes
/// ([`GpuBatchNorm::set_single_pass`]). Returns the number of adapters checked.
pub fn check_parity_with(
    case: &str,
    config: &BatchNormConfig,
    state: &BatchNormState,
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
    tune: &dyn Fn(&mut GpuBatchNorm),
) -> usize {
    let mut bs = backends_with(config, state, tune);
    // The GPU layers again with their training forwards in passes: on CPU
    // adapters the layers above run them in one pass where it applies.
    for ctx in gpu_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        tune(&mut bn);
        bn.set_single_pass(Some(false));
        bn.set_state(state).unwrap();
        bs.push(Box::new(bn));
    }
    let mut outs: Vec<Outputs> = bs.iter_mut().map(|b| run_all(b.as_mut(), x, dy)).collect();
    for o in &mut outs[1 + gpu_contexts().len()..] {
        o.name.push_str(" (forward in passes)");
    }
    let want = &outs[0];
    let mut failures = Vec::new();
    for got in &outs[1..] {
        assert_eq!(got.tensors.len(), want.tensors.len(), "{case} {}", got.name);
        assert_eq!(
            got.nbt, want.nbt,
            "{case} {}: num_batches_tracked",
            got.name
        );
        for ((k, g), (k2, w)) in got.tensors.iter().zip(&want.tensors) {
            assert_eq!(k, k2);
            if let Err(e) = all_close(k, g, w, TOL, TOL) {
                failures.push(format!("{case} on {}: {e}", got.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    (outs.len() - 1) / 2
}

/// `x` cut along axis 0 into parts of `sizes` samples (which may be 0): the
/// ranks' parts of a batch.
pub fn split(x: &ArrayD<f32>, sizes: &[usize]) -> Vec<ArrayD<f32>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = x
                .slice_axis(ndarray::Axis(0), (at..at + n).into())
                .to_owned();
            at += n;
            part
        })
        .collect()
}

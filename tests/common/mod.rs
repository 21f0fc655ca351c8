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

/// Whether a missing adapter must fail the test (CI, or BNORM_REQUIRE_GPU=1).
pub fn gpu_required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("BNORM_REQUIRE_GPU")
}

/// Every adapter wgpu finds (once per test binary). Without one, the test
/// fails when a GPU is required and says SKIPPED loudly otherwise.
pub fn gpu_contexts() -> &'static [GpuContext] {
    static CONTEXTS: OnceLock<Vec<GpuContext>> = OnceLock::new();
    CONTEXTS.get_or_init(|| match GpuContext::all(&AdapterSelection::from_env()) {
        Ok(c) => c,
        Err(e) if gpu_required() => panic!("a GPU adapter is required (CI or BNORM_REQUIRE_GPU) but: {e}"),
        Err(e) => {
            eprintln!("\n*** SKIPPED GPU backends: {e} ***\n");
            Vec::new()
        }
    })
}

/// The CPU reference and one GPU layer per adapter, all with `config` and `state`.
pub fn backends(config: &BatchNormConfig, state: &BatchNormState) -> Vec<Box<dyn BatchNormBackend>> {
    let mut out: Vec<Box<dyn BatchNormBackend>> = vec![Box::new(CpuReference::new(config.clone()).unwrap())];
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
pub fn all_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} vs expected {}", got.len(), want.len()));
    }
    let mut bad = 0;
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() || g.is_nan() {
            w.is_nan() && g.is_nan()
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        if !ok {
            bad += 1;
            let excess = if (g - w).is_nan() { f32::INFINITY } else { (g - w).abs() - rtol * w.abs() };
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

//! Folding a BatchNorm into the layer before it (`wgpu_batchnorm::fold`):
//! PyTorch's fused weights (tests/fixtures/fold/layers.safetensors, written
//! by scripts/make_fold_fixtures.py), agreement with the CPU reference's
//! evaluation, and the errors.

#[path = "common/safetensors_f32.rs"]
mod safetensors_f32;

use ndarray::{Array2, ArrayD, IxDyn};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::BTreeMap;
use wgpu_batchnorm::fold::{FoldTarget, fold, fold_conv, fold_conv_transpose, fold_linear};
use wgpu_batchnorm::{BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference, Error};

const LAYERS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fold/layers.safetensors"
);

/// Every F32 tensor of the safetensors file at `path`, and the metadata.
fn load(path: &str) -> (safetensors_f32::Tensors, BTreeMap<String, String>) {
    safetensors_f32::load(&std::fs::read(path).unwrap())
}

/// The largest difference in f32 ulps of `want`, and how many elements differ at all.
fn ulps(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f32;
    let mut differ = 0;
    for (&g, &w) in got.iter().zip(want) {
        if g != w {
            differ += 1;
            let ulp = f32::from_bits(w.abs().to_bits() + 1) - w.abs();
            worst = worst.max((g - w).abs() / ulp);
        }
    }
    (worst, differ)
}

#[test]
fn every_layer_case_matches_pytorch_fusion() {
    let (t, meta) = load(LAYERS);
    let cases: Vec<&str> = meta["cases"].split(',').collect();
    assert_eq!(cases.len(), 9, "{cases:?}");
    let vec = |k: String| t.get(&k).map(|a| a.iter().copied().collect::<Vec<f32>>());
    for case in cases {
        let p = format!("{case}.");
        let bn = BatchNormState {
            weight: vec(format!("{p}bn.weight")),
            bias: vec(format!("{p}bn.bias")),
            running_mean: vec(format!("{p}bn.running_mean")),
            running_var: vec(format!("{p}bn.running_var")),
            num_batches_tracked: None,
        };
        let eps: f64 = meta[&format!("{p}eps")].parse().unwrap();
        let groups: usize = meta[&format!("{p}groups")].parse().unwrap();
        let target = match meta[&format!("{p}kind")].as_str() {
            "conv" => FoldTarget::Conv,
            "conv_transpose" => FoldTarget::ConvTranspose { groups },
            "linear" => FoldTarget::Linear,
            other => panic!("{case}: unknown kind {other}"),
        };
        let weight = &t[&format!("{p}weight")];
        let bias = vec(format!("{p}bias"));
        let folded = fold(target, weight.view(), bias.as_deref(), &bn, eps)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let want_w = &t[&format!("{p}fused.weight")];
        let want_b = vec(format!("{p}fused.bias")).unwrap();
        assert_eq!(folded.weight.shape(), want_w.shape(), "{case}");
        let got_w: Vec<f32> = folded.weight.iter().copied().collect();
        let want_w: Vec<f32> = want_w.iter().copied().collect();
        // PyTorch's float64 fusion rounded to f32: the same value, or the neighbour.
        let (w_ulps, w_differ) = ulps(&got_w, &want_w);
        let (b_ulps, b_differ) = ulps(&folded.bias, &want_b);
        assert!(
            w_ulps <= 1.0 && b_ulps <= 1.0,
            "{case} ({target}): weight {w_differ} of {} differ, worst {w_ulps} ulp; bias {b_differ} differ, worst {b_ulps} ulp",
            got_w.len()
        );
    }
}

#[test]
fn the_wrappers_are_fold_with_their_target() {
    let (t, _) = load(LAYERS);
    let state = |p: &str| BatchNormState {
        weight: None,
        bias: None,
        running_mean: Some(t[&format!("{p}.bn.running_mean")].iter().copied().collect()),
        running_var: Some(t[&format!("{p}.bn.running_var")].iter().copied().collect()),
        num_batches_tracked: None,
    };
    let w = &t["conv2d_nobias_affine_off.weight"];
    let bn = state("conv2d_nobias_affine_off");
    assert_eq!(
        fold_conv(w.view(), None, &bn, 1e-3).unwrap(),
        fold(FoldTarget::Conv, w.view(), None, &bn, 1e-3).unwrap()
    );
    let w = &t["conv_transpose1d_nobias.weight"];
    let bn = state("conv_transpose1d_nobias");
    assert_eq!(
        fold_conv_transpose(w.view(), None, 1, &bn, 1e-5).unwrap(),
        fold(
            FoldTarget::ConvTranspose { groups: 1 },
            w.view(),
            None,
            &bn,
            1e-5
        )
        .unwrap()
    );
    let w = &t["linear_nobias_affine_off.weight"];
    let bn = state("linear_nobias_affine_off");
    let folded = fold_linear(w.view(), None, &bn, 1e-5).unwrap();
    assert_eq!(
        folded,
        fold(FoldTarget::Linear, w.view(), None, &bn, 1e-5).unwrap()
    );
    // Without affine parameters the fixture's expected values still hold.
    let (wu, _) = ulps(
        folded.weight.as_slice().unwrap(),
        t["linear_nobias_affine_off.fused.weight"]
            .as_slice()
            .unwrap(),
    );
    assert!(wu <= 1.0);
}

/// A linear layer then the CPU reference's evaluation-mode BatchNorm equals
/// the folded linear layer, on random data and state.
#[test]
fn folded_linear_equals_linear_then_reference_batchnorm() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, inputs, c) = (6, 7, 5);
    let w = Array2::from_shape_fn((c, inputs), |_| rng.random_range(-1.0f32..1.0));
    let b: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x = Array2::from_shape_fn((n, inputs), |_| rng.random_range(-2.0f32..2.0));
    let config = BatchNormConfig::new(c).with_eps(1e-3);
    let state = BatchNormState {
        weight: Some((0..c).map(|_| rng.random_range(0.5..1.5)).collect()),
        bias: Some((0..c).map(|_| rng.random_range(-0.5..0.5)).collect()),
        running_mean: Some((0..c).map(|_| rng.random_range(-1.0..1.0)).collect()),
        running_var: Some((0..c).map(|_| rng.random_range(0.1..2.0)).collect()),
        num_batches_tracked: Some(4),
    };
    let linear = |w: &Array2<f32>, b: &[f32]| {
        Array2::from_shape_fn((n, c), |(i, o)| {
            let s: f64 = (0..inputs)
                .map(|k| f64::from(x[[i, k]]) * f64::from(w[[o, k]]))
                .sum();
            (s + f64::from(b[o])) as f32
        })
    };
    let mut bn = CpuReference::new(config.clone()).unwrap();
    bn.set_state(&state).unwrap();
    let want = bn.forward_eval(linear(&w, &b).into_dyn().view()).unwrap();
    let folded = fold_linear(w.view().into_dyn(), Some(&b), &state, config.eps).unwrap();
    let fw = folded.weight.into_dimensionality().unwrap();
    let got = linear(&fw, &folded.bias);
    for (g, w) in got.iter().zip(want.iter()) {
        assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{g} vs {w}");
    }
}

fn bn(c: usize) -> BatchNormState {
    BatchNormState {
        weight: Some((0..c).map(|i| 1.0 + i as f32).collect()),
        bias: Some(vec![0.5; c]),
        running_mean: Some(vec![0.25; c]),
        running_var: Some(vec![2.0; c]),
        num_batches_tracked: Some(1),
    }
}

fn fold_err(
    target: FoldTarget,
    dims: &[usize],
    bias: Option<&[f32]>,
    bn: &BatchNormState,
    eps: f64,
) -> String {
    let w = ArrayD::from_elem(IxDyn(dims), 1.0f32);
    match fold(target, w.view(), bias, bn, eps) {
        Err(e @ Error::Fold { .. }) => e.to_string(),
        other => panic!("expected Error::Fold for {target} {dims:?}, got {other:?}"),
    }
}

#[test]
fn mismatched_channels_and_ranks_are_errors_naming_them() {
    let s = bn(4);
    let e = fold_err(FoldTarget::Conv, &[3, 2, 3, 3], None, &s, 1e-5);
    assert!(
        e.contains("convolution of weight shape [3, 2, 3, 3]")
            && e.contains("3 output channels but the BatchNorm has 4"),
        "{e}"
    );
    // A transposed convolution's output channels are dim 1 (times groups).
    let e = fold_err(
        FoldTarget::ConvTranspose { groups: 1 },
        &[4, 3, 2, 2],
        None,
        &s,
        1e-5,
    );
    assert!(
        e.contains("3 output channels but the BatchNorm has 4"),
        "{e}"
    );
    let e = fold_err(
        FoldTarget::ConvTranspose { groups: 3 },
        &[4, 2, 2],
        None,
        &s,
        1e-5,
    );
    assert!(
        e.contains("groups 3 does not divide the 4 input channels"),
        "{e}"
    );
    let e = fold_err(
        FoldTarget::ConvTranspose { groups: 0 },
        &[4, 2, 2],
        None,
        &s,
        1e-5,
    );
    assert!(e.contains("groups must be at least 1"), "{e}");
    let e = fold_err(FoldTarget::Linear, &[4, 2, 1], None, &s, 1e-5);
    assert!(
        e.contains("linear layer's weight is (out, in), rank 2, got rank 3"),
        "{e}"
    );
    let e = fold_err(FoldTarget::Conv, &[4, 2], None, &s, 1e-5);
    assert!(e.contains("rank 3 or more, got rank 2"), "{e}");
    let e = fold_err(FoldTarget::Linear, &[4, 2], Some(&[0.0; 3]), &s, 1e-5);
    assert!(e.contains("bias has length 3, expected 4"), "{e}");
    // Grouped and ungrouped transposed convolutions that fit fold.
    let w = ArrayD::from_elem(IxDyn(&[4, 2, 2]), 1.0f32);
    assert!(fold_conv_transpose(w.view(), None, 2, &s, 1e-5).is_ok());
}

#[test]
fn bad_batchnorm_states_are_errors_naming_the_channel() {
    let dims = [4, 2, 1];
    let conv = FoldTarget::Conv;
    let mut s = bn(4);
    s.running_var.as_mut().unwrap()[2] = -0.5;
    let e = fold_err(conv, &dims, None, &s, 1e-5);
    assert!(e.contains("running_var of channel 2 is -0.5"), "{e}");

    let mut s = bn(4);
    s.running_var.as_mut().unwrap()[1] = 0.0;
    let e = fold_err(conv, &dims, None, &s, 0.0);
    assert!(
        e.contains("running_var + eps of channel 1 is 0 + 0 = 0"),
        "{e}"
    );
    // The same channel with eps > 0 folds: scale 1/sqrt(eps).
    let w = ArrayD::from_elem(IxDyn(&dims), 1.0f32);
    let f = fold_conv(w.view(), None, &s, 1e-4).unwrap();
    assert_eq!(f.weight[[1, 0, 0]], (2.0 / 1e-4f64.sqrt()) as f32);

    let mut s = bn(4);
    s.running_mean.as_mut().unwrap()[3] = f32::NAN;
    let e = fold_err(conv, &dims, None, &s, 1e-5);
    assert!(e.contains("running_mean of channel 3 is NaN"), "{e}");
    let mut s = bn(4);
    s.weight.as_mut().unwrap()[0] = f32::INFINITY;
    let e = fold_err(conv, &dims, None, &s, 1e-5);
    assert!(e.contains("weight of channel 0 is inf"), "{e}");
    let mut s = bn(4);
    s.bias = Some(vec![0.0; 3]);
    let e = fold_err(conv, &dims, None, &s, 1e-5);
    assert!(
        e.contains("bias has length 3, but running_mean has 4"),
        "{e}"
    );

    let mut s = bn(4);
    s.running_mean = None;
    s.running_var = None;
    let e = fold_err(conv, &dims, None, &s, 1e-5);
    assert!(e.contains("no running statistics"), "{e}");

    for eps in [-1e-5, f64::NAN, f64::INFINITY] {
        let e = fold_err(conv, &dims, None, &bn(4), eps);
        assert!(e.contains("eps must be finite and >= 0"), "{e}");
    }
}

#[test]
fn a_fold_past_f32_is_an_error() {
    let mut s = bn(2);
    s.running_var = Some(vec![0.0, 1.0]);
    s.weight = Some(vec![1e33, 1.0]);
    let e = fold_err(FoldTarget::Linear, &[2, 3], None, &s, 1e-12);
    assert!(e.contains("overflows f32"), "{e}");
}

//! `bnorm fold`'s logic (`fold_state_dict`) on a small model's state_dict
//! written by PyTorch (tests/fixtures/fold/model.safetensors: conv + BN
//! blocks named like torchvision's ResNet, a grouped conv, a Sequential
//! downsample, a transposed conv + BN without affine, a linear + BatchNorm1d;
//! see scripts/make_fold_fixtures.py), checked against PyTorch's fused
//! weights and its eval output of the unfolded model
//! (tests/fixtures/fold/model_check.safetensors).

#[path = "common/safetensors_f32.rs"]
mod safetensors_f32;

use ndarray::{Array2, Array4, ArrayD, Axis, Ix2, Ix4};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};
use wgpu_batchnorm::fold::{FoldOptions, FoldTarget, PairRule, fold_state_dict};
use wgpu_batchnorm::{BatchNormBackend, CpuReference, Error, StateDict};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fold/");

use safetensors_f32::{Tensors, load};

fn model() -> StateDict {
    StateDict::open(format!("{DIR}model.safetensors")).unwrap()
}

fn check() -> (Tensors, BTreeMap<String, String>) {
    load(&std::fs::read(format!("{DIR}model_check.safetensors")).unwrap())
}

/// What `bnorm fold model.safetensors --pair up=up_norm --transposed up` passes.
fn cli_options() -> FoldOptions {
    FoldOptions {
        pairs: vec![("up".into(), "up_norm".into())],
        transposed: vec![("up".into(), 1)],
        ..FoldOptions::default()
    }
}

/// `|got - want| <= atol + rtol * |want|` everywhere (FIXTURES.md's f32 tolerance).
fn assert_close(what: &str, got: &ArrayD<f64>, want: &ArrayD<f32>, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let mut bad = 0;
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let err = (g - f64::from(w)).abs();
        if err > tol + tol * f64::from(w).abs() {
            bad += 1;
        }
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        bad == 0,
        "{what}: {bad} of {} elements out of tolerance, worst {:.3e} at flat index {}",
        got.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn bnorm_fold_pairs_every_batchnorm_and_matches_pytorch_fused_weights() {
    let sd = model();
    let folded = fold_state_dict(&sd, &cli_options()).unwrap();
    let (want, meta) = check();

    // The pairs found are the model's, by the documented rules.
    let got: BTreeSet<String> = folded
        .pairs
        .iter()
        .map(|p| format!("{}={}", p.layer, p.batchnorm))
        .collect();
    let expected: BTreeSet<String> = meta["pairs"].split(',').map(String::from).collect();
    assert_eq!(got, expected);
    let rule = |bn: &str| folded.pairs.iter().find(|p| p.batchnorm == bn).unwrap();
    assert_eq!(rule("layer1.0.bn2").rule, PairRule::Name);
    assert_eq!(rule("bn1").rule, PairRule::Name);
    assert_eq!(rule("layer1.1.downsample.1").rule, PairRule::Sequential);
    assert_eq!(rule("head.2").rule, PairRule::Sequential);
    assert_eq!(rule("head.2").target, FoldTarget::Linear);
    assert_eq!(rule("up_norm").rule, PairRule::Given);
    assert_eq!(
        rule("up_norm").target,
        FoldTarget::ConvTranspose { groups: 1 }
    );
    assert!(rule("layer1.0.bn1").bias_added && !rule("bn1").bias_added);

    // Folded weights: PyTorch's float64 fusion rounded to f32, to the ulp.
    let (out, _) = load(folded.bytes());
    let mut compared = 0;
    for (key, w) in want.iter().filter(|(k, _)| k.starts_with("fused.")) {
        let key = &key["fused.".len()..];
        let g = &out[key];
        assert_eq!(g.shape(), w.shape(), "{key}");
        for (&a, &b) in g.iter().zip(w.iter()) {
            let ulp = f32::from_bits(b.abs().to_bits() + 1) - b.abs();
            assert!((a - b).abs() <= ulp, "{key}: {a} vs PyTorch's {b}");
        }
        compared += 1;
    }
    assert_eq!(compared, 16);

    // No BatchNorm key is left; every other tensor is as it was.
    let (orig, _) = load(&std::fs::read(format!("{DIR}model.safetensors")).unwrap());
    assert!(
        StateDict::from_bytes(folded.bytes().to_vec(), "folded")
            .unwrap()
            .batchnorm_layers()
            .is_empty()
    );
    assert_eq!(folded.removed_keys.len(), 7 * 5 + 3);
    assert!(
        folded
            .removed_keys
            .iter()
            .any(|k| k == "layer1.0.bn1.num_batches_tracked")
    );
    let folded_layers: BTreeSet<&str> = folded.pairs.iter().map(|p| p.layer.as_str()).collect();
    for (key, t) in &orig {
        let owner = key.rsplit_once('.').map_or("", |(p, _)| p);
        if folded_layers.contains(owner) || folded.removed_keys.contains(key) {
            continue;
        }
        assert_eq!(&out[key], t, "{key} changed");
    }
    assert_eq!(folded.tensors, out.len());
}

#[test]
fn pytorchs_folded_model_output_matches_the_unfolded_one() {
    let (t, _) = check();
    let y_folded = t["y_folded"].mapv(f64::from);
    assert_close("PyTorch y_folded vs y", &y_folded, &t["y"], 1e-4);
}

/// The model of scripts/make_fold_fixtures.py (`TinyNet`), run in f64 on the
/// weights in `t`; the BatchNorms run on the CPU reference in evaluation
/// from `bns`, or are absent (folded) when `bns` is `None`.
struct TinyNet<'a> {
    t: &'a Tensors,
    bns: Option<&'a StateDict>,
}

impl TinyNet<'_> {
    fn norm(&self, prefix: &str, x: ArrayD<f64>) -> ArrayD<f64> {
        let Some(sd) = self.bns else {
            assert!(!self.t.contains_key(&format!("{prefix}.running_mean")));
            return x;
        };
        let config = sd.config(prefix).unwrap();
        let state = sd.state(prefix, &config).unwrap();
        let mut bn = CpuReference::new(config).unwrap();
        bn.set_state(&state).unwrap();
        bn.forward_eval(x.mapv(|v| v as f32).view())
            .unwrap()
            .mapv(f64::from)
    }

    fn bias(&self, layer: &str) -> Option<&ArrayD<f32>> {
        self.t.get(&format!("{layer}.bias"))
    }

    fn conv(
        &self,
        layer: &str,
        x: &Array4<f64>,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> ArrayD<f64> {
        let w = &self.t[&format!("{layer}.weight")];
        let b = self.bias(layer);
        let (n, cin, h, wd) = x.dim();
        let (o, cpg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
        assert_eq!(cpg * groups, cin, "{layer}");
        let opg = o / groups;
        let (oh, ow) = (
            (h + 2 * pad - kh) / stride + 1,
            (wd + 2 * pad - kw) / stride + 1,
        );
        Array4::from_shape_fn((n, o, oh, ow), |(ni, oc, y, xx)| {
            let g = oc / opg;
            let mut s = b.map_or(0.0, |b| f64::from(b[[oc]]));
            for ci in 0..cpg {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (iy, ix) = (
                            (y * stride + ky).wrapping_sub(pad),
                            (xx * stride + kx).wrapping_sub(pad),
                        );
                        if iy < h && ix < wd {
                            s += x[[ni, g * cpg + ci, iy, ix]] * f64::from(w[[oc, ci, ky, kx]]);
                        }
                    }
                }
            }
            s
        })
        .into_dyn()
    }

    /// Transposed convolution, groups 1, no padding.
    fn conv_transpose(&self, layer: &str, x: &Array4<f64>, stride: usize) -> ArrayD<f64> {
        let w = &self.t[&format!("{layer}.weight")];
        let (n, cin, h, wd) = x.dim();
        let (o, kh, kw) = (w.shape()[1], w.shape()[2], w.shape()[3]);
        let mut y = Array4::<f64>::zeros((n, o, (h - 1) * stride + kh, (wd - 1) * stride + kw));
        for ((ni, c, iy, ix), &v) in x.indexed_iter() {
            for oc in 0..o {
                for ky in 0..kh {
                    for kx in 0..kw {
                        y[[ni, oc, iy * stride + ky, ix * stride + kx]] +=
                            v * f64::from(w[[c, oc, ky, kx]]);
                    }
                }
            }
        }
        assert_eq!(cin, w.shape()[0]);
        if let Some(b) = self.bias(layer) {
            for ((_, oc, _, _), v) in y.indexed_iter_mut() {
                *v += f64::from(b[[oc]]);
            }
        }
        y.into_dyn()
    }

    fn linear(&self, layer: &str, x: &Array2<f64>) -> ArrayD<f64> {
        let w = self.t[&format!("{layer}.weight")]
            .view()
            .into_dimensionality::<Ix2>()
            .unwrap();
        let b = self.bias(layer);
        Array2::from_shape_fn((x.nrows(), w.nrows()), |(i, o)| {
            let s: f64 = (0..w.ncols())
                .map(|k| x[[i, k]] * f64::from(w[[o, k]]))
                .sum();
            s + b.map_or(0.0, |b| f64::from(b[[o]]))
        })
        .into_dyn()
    }

    fn forward(&self, x: &ArrayD<f32>) -> ArrayD<f64> {
        let relu = |a: ArrayD<f64>| a.mapv(|v| v.max(0.0));
        let four = |a: ArrayD<f64>| a.into_dimensionality::<Ix4>().unwrap();
        let x = four(x.mapv(f64::from));
        let mut x = four(relu(self.norm("bn1", self.conv("conv1", &x, 1, 1, 1))));
        for (block, stride, downsample) in [("layer1.0", 1, false), ("layer1.1", 2, true)] {
            let out = four(relu(self.norm(
                &format!("{block}.bn1"),
                self.conv(&format!("{block}.conv1"), &x, stride, 1, 1),
            )));
            let out = self.norm(
                &format!("{block}.bn2"),
                self.conv(&format!("{block}.conv2"), &out, 1, 1, 2),
            );
            let identity = if downsample {
                let d = self.conv(&format!("{block}.downsample.0"), &x, stride, 0, 1);
                self.norm(&format!("{block}.downsample.1"), d)
            } else {
                x.into_dyn()
            };
            x = four(relu(out + identity));
        }
        let x = relu(self.norm("up_norm", self.conv_transpose("up", &x, 2)));
        let n = x.len_of(Axis(0));
        let flat = x
            .into_shape_with_order((n, 4 * 6 * 6))
            .unwrap()
            .into_dimensionality::<Ix2>()
            .unwrap();
        self.norm("head.2", self.linear("head.1", &flat))
    }
}

#[test]
fn the_folded_state_dict_computes_pytorchs_output_of_the_unfolded_model() {
    let (check, _) = check();
    let (x, y) = (&check["x"], &check["y"]);
    let sd = model();
    let (orig, _) = load(&std::fs::read(format!("{DIR}model.safetensors")).unwrap());

    // The harness first: the unfolded model with the CPU reference's BatchNorms is PyTorch's.
    let unfolded = TinyNet {
        t: &orig,
        bns: Some(&sd),
    }
    .forward(x);
    assert_close(
        "unfolded model (CPU reference BatchNorm) vs PyTorch",
        &unfolded,
        y,
        1e-4,
    );

    // Then the folded state_dict alone, no BatchNorm left to run.
    let folded = fold_state_dict(&sd, &cli_options()).unwrap();
    let (t, _) = load(folded.bytes());
    let got = TinyNet { t: &t, bns: None }.forward(x);
    assert_close("folded model vs PyTorch's unfolded model", &got, y, 1e-4);

    // And the state_dict before folding, run without its BatchNorms, is not it.
    let (mut no_bn, _) = load(&std::fs::read(format!("{DIR}model.safetensors")).unwrap());
    no_bn.retain(|k, _| !folded.removed_keys.contains(k));
    let wrong = TinyNet {
        t: &no_bn,
        bns: None,
    }
    .forward(x);
    let far = wrong
        .iter()
        .zip(y.iter())
        .filter(|(a, b)| (**a - f64::from(**b)).abs() > 1e-2)
        .count();
    assert!(
        far > 0,
        "dropping the BatchNorms without folding must change the output"
    );
}

#[test]
fn unpairable_and_misdescribed_batchnorms_are_errors() {
    let sd = model();
    // `up_norm` has no rule: the error names it and what to do.
    let err = fold_state_dict(&sd, &FoldOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Checkpoint { .. }), "{msg}");
    assert!(
        msg.contains("1 BatchNorm(s) cannot be paired")
            && msg.contains("`up_norm`: no rule applies"),
        "{msg}"
    );
    assert!(msg.contains("--pair LAYER=BATCHNORM"), "{msg}");

    // Paired but not said to be transposed: a channel mismatch, with the hint.
    let options = FoldOptions {
        pairs: vec![("up".into(), "up_norm".into())],
        ..FoldOptions::default()
    };
    let msg = fold_state_dict(&sd, &options).unwrap_err().to_string();
    assert!(
        msg.contains("cannot fold `up_norm` into `up` (convolution of weight shape [6, 4, 2, 2])")
            && msg.contains("6 output channels but the BatchNorm has 4")
            && msg.contains("--transposed up"),
        "{msg}"
    );

    let bad = |options: FoldOptions, want: &str| {
        let msg = fold_state_dict(&sd, &options).unwrap_err().to_string();
        assert!(msg.contains(want), "expected {want:?} in: {msg}");
    };
    bad(
        FoldOptions {
            pairs: vec![("nothing".into(), "up_norm".into())],
            ..FoldOptions::default()
        },
        "`nothing` is not a layer with a weight of rank 2 or more",
    );
    bad(
        FoldOptions {
            pairs: vec![("up".into(), "conv1".into())],
            ..FoldOptions::default()
        },
        "`conv1` is not a BatchNorm with running statistics",
    );
    bad(
        FoldOptions {
            pairs: vec![("conv1".into(), "up_norm".into())],
            ..FoldOptions::default()
        },
        "both `bn1` and `up_norm` would fold into `conv1`",
    );
    bad(
        FoldOptions {
            keep: vec!["conv1".into()],
            ..FoldOptions::default()
        },
        "cannot keep `conv1`",
    );
    bad(
        FoldOptions {
            transposed: vec![("head.0".into(), 1)],
            ..cli_options()
        },
        "transposed layer `head.0` is not a layer any BatchNorm folds into",
    );
    bad(
        FoldOptions {
            transposed: vec![("up".into(), 1), ("head.1".into(), 1)],
            ..cli_options()
        },
        "`head.1` is listed as a transposed convolution but its weight [5, 144] has rank 2",
    );
}

#[test]
fn kept_batchnorms_stay_and_eps_reaches_the_fold() {
    let sd = model();
    let kept = fold_state_dict(
        &sd,
        &FoldOptions {
            keep: vec!["up_norm".into()],
            ..FoldOptions::default()
        },
    )
    .unwrap();
    assert_eq!(kept.pairs.len(), 7);
    assert_eq!(kept.kept, ["up_norm"]);
    let back = StateDict::from_bytes(kept.bytes().to_vec(), "kept").unwrap();
    let layers: Vec<String> = back
        .batchnorm_layers()
        .into_iter()
        .map(|l| l.prefix)
        .collect();
    assert_eq!(layers, ["up_norm"]);
    assert!(
        back.keys()
            .contains(&"up_norm.num_batches_tracked".to_string())
    );
    let orig = load(&std::fs::read(format!("{DIR}model.safetensors")).unwrap()).0;
    let out = load(kept.bytes()).0;
    assert_eq!(
        out["up.weight"], orig["up.weight"],
        "`up` is not folded when up_norm is kept"
    );

    // eps is not in a state_dict: the option changes the fold.
    let a = load(fold_state_dict(&sd, &cli_options()).unwrap().bytes()).0;
    let b = load(
        fold_state_dict(
            &sd,
            &FoldOptions {
                eps: 1e-3,
                ..cli_options()
            },
        )
        .unwrap()
        .bytes(),
    )
    .0;
    assert_ne!(a["conv1.weight"], b["conv1.weight"]);
}

/// A `model.half()` state_dict folds too, and its folded layers stay F16:
/// the f32 fold of the f16 values, rounded to f16.
#[test]
fn f16_weights_fold_into_f16() {
    let bytes = std::fs::read(format!("{DIR}model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let half: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| match t.dtype() {
            safetensors::Dtype::F32 => {
                let data = t
                    .data()
                    .chunks_exact(4)
                    .flat_map(|b| {
                        half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .to_le_bytes()
                    })
                    .collect();
                (k, data, t.shape().to_vec(), safetensors::Dtype::F16)
            }
            d => (k, t.data().to_vec(), t.shape().to_vec(), d),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = half
        .iter()
        .map(|(k, d, s, t)| {
            let view = safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap();
            (k.clone(), view)
        })
        .collect();
    let f16_file = safetensors::serialize(views, None).unwrap();
    let sd = StateDict::from_bytes(f16_file.clone(), "model_f16").unwrap();
    let folded = fold_state_dict(&sd, &cli_options()).unwrap();
    let out = SafeTensors::deserialize(folded.bytes()).unwrap();
    let w = out.tensor("layer1.0.conv1.weight").unwrap();
    assert_eq!(w.dtype(), safetensors::Dtype::F16);
    assert_eq!(
        out.tensor("layer1.0.conv1.bias").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    // Against PyTorch's f32 fold of the f32 model, within f16 rounding of the inputs and output.
    let (want, _) = check();
    let want = &want["fused.layer1.0.conv1.weight"];
    for (b, &w32) in w.data().chunks_exact(2).zip(want.iter()) {
        let g = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert!((g - w32).abs() <= 5e-3 * w32.abs().max(1.0), "{g} vs {w32}");
    }
}

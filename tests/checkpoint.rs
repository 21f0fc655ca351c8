//! PyTorch checkpoints: a trained model's BatchNorm state loaded from a
//! safetensors state_dict, evaluated on every backend against PyTorch's output,
//! written back, and refused with clear errors when it does not fit.

mod common;

use common::{TOL, all_close, backends, flat, gpu_contexts};
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wgpu_batchnorm::checkpoint::{self, BatchNormLayer, states_to_bytes};
use wgpu_batchnorm::{BatchNormConfig, BatchNormState, Error, GpuBatchNorm, StateDict};

fn ck(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/checkpoints")
        .join(name)
}

fn resnet() -> StateDict {
    StateDict::open(ck("resnet_bn.safetensors")).unwrap()
}

const PREFIXES: [(&str, usize); 8] = [
    ("bn", 8),
    ("layer1.0.bn1", 8),
    ("layer1.0.bn2", 8),
    ("layer1.1.bn1", 8),
    ("layer1.1.bn2", 8),
    ("layer2.0.bn1", 16),
    ("layer2.0.bn2", 16),
    ("layer2.0.downsample.1", 16),
];

#[test]
fn lists_the_batchnorm_layers_in_module_order() {
    let layers = checkpoint::list_batchnorm_layers(ck("resnet_bn.safetensors")).unwrap();
    let want: Vec<BatchNormLayer> = PREFIXES
        .iter()
        .map(|&(p, c)| BatchNormLayer {
            prefix: p.into(),
            num_features: c,
            affine: true,
            num_batches_tracked: Some(5),
        })
        .collect();
    assert_eq!(layers, want);
    assert_eq!(
        layers[1].to_string(),
        "layer1.0.bn1: 8 features, affine, num_batches_tracked 5"
    );
}

#[test]
fn loaded_layer_evaluates_like_pytorch_on_every_backend() {
    let bytes = std::fs::read(ck("resnet_bn_eval.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let prefix = meta["prefix"].as_str();
    assert_eq!(prefix, "layer1.0.bn1");
    assert_eq!(meta["layout"], "NCHW");
    let eps: f64 = meta["eps"].parse().unwrap();
    let read = |key: &str| {
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    };
    let x = read("x");
    let want = read(&format!("y_{prefix}"));

    let sd = resnet();
    let config = sd.config(prefix).unwrap().with_eps(eps);
    assert_eq!(
        (
            config.num_features,
            config.affine,
            config.track_running_stats
        ),
        (8, true, true)
    );
    let state = sd.state(prefix, &config).unwrap();
    assert_eq!(state.num_batches_tracked, Some(5));
    // The trained statistics are not PyTorch's initial ones, so this checks the load.
    assert_ne!(state.running_var, BatchNormState::new(&config).running_var);

    let mut checked = 0;
    for mut bn in backends(&config, &state) {
        let y = bn.forward_eval(x.view()).unwrap();
        assert_eq!(y.shape(), want.shape());
        all_close(
            &format!("y on {}", bn.backend_name()),
            &flat(&y),
            &flat(&want),
            TOL,
            TOL,
        )
        .unwrap();
        // A layer that ignored the loaded statistics would be far off.
        let fresh = BatchNormState::new(&config);
        bn.set_state(&fresh).unwrap();
        let y0 = bn.forward_eval(x.view()).unwrap();
        assert!(all_close("initial state", &flat(&y0), &flat(&want), TOL, TOL).is_err());
        checked += 1;
    }
    assert_eq!(checked, 1 + gpu_contexts().len());
}

#[test]
fn prefix_with_or_without_trailing_dot() {
    let sd = resnet();
    let config = sd.config("layer2.0.downsample.1").unwrap();
    assert_eq!(config.num_features, 16);
    let a = sd.state("layer2.0.downsample.1", &config).unwrap();
    let b = sd.state("layer2.0.downsample.1.", &config).unwrap();
    assert_eq!(a, b);
}

#[test]
fn save_then_load_is_identical() {
    let sd = resnet();
    let states: Vec<(String, BatchNormConfig, BatchNormState)> = PREFIXES
        .iter()
        .map(|&(p, _)| {
            let config = sd.config(p).unwrap();
            let state = sd.state(p, &config).unwrap();
            (p.to_string(), config, state)
        })
        .collect();
    let layers: Vec<(&str, &BatchNormState)> =
        states.iter().map(|(p, _, s)| (p.as_str(), s)).collect();
    let bytes = states_to_bytes(&layers, None).unwrap();
    assert_eq!(
        bytes,
        states_to_bytes(&layers, None).unwrap(),
        "serialization is deterministic"
    );

    // Same keys, dtypes, shapes and bytes as the file PyTorch wrote.
    let original = std::fs::read(ck("resnet_bn.safetensors")).unwrap();
    let original = SafeTensors::deserialize(&original).unwrap();
    let written = SafeTensors::deserialize(&bytes).unwrap();
    let mut names_a = original.names();
    let mut names_b = written.names();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b);
    for name in names_a {
        assert_eq!(
            original.tensor(name).unwrap(),
            written.tensor(name).unwrap(),
            "{name}"
        );
    }

    let back = StateDict::from_bytes(bytes, "memory").unwrap();
    assert_eq!(
        back.metadata().unwrap().get("format").map(String::as_str),
        Some("pt")
    );
    for (p, config, state) in &states {
        assert_eq!(&back.state(p, config).unwrap(), state, "{p}");
    }

    // Through a file, one layer.
    let dir = std::env::temp_dir().join(format!("bnorm-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bn1.safetensors");
    let (p, config, state) = &states[1];
    checkpoint::save_state(&file, p, state).unwrap();
    assert_eq!(&checkpoint::load_state(&file, p, config).unwrap(), state);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn round_trip_through_every_gpu_layer() {
    let sd = resnet();
    let config = sd.config("layer2.0.bn2").unwrap();
    let state = sd.state("layer2.0.bn2", &config).unwrap();
    for ctx in gpu_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        bn.set_state(&state).unwrap();
        let bytes = states_to_bytes(&[("layer2.0.bn2", &bn.state().unwrap())], None).unwrap();
        let back = StateDict::from_bytes(bytes, ctx.label()).unwrap();
        assert_eq!(
            back.state("layer2.0.bn2", &config).unwrap(),
            state,
            "{}",
            ctx.label()
        );
    }
}

#[test]
fn bare_keys_without_prefix() {
    let config = BatchNormConfig::new(4).with_affine(false);
    let mut state = BatchNormState::new(&config);
    state.running_mean = Some(vec![0.5, -1.0, 2.0, 0.0]);
    state.num_batches_tracked = Some(12);
    let bytes = states_to_bytes(&[("", &state)], None).unwrap();
    let sd = StateDict::from_bytes(bytes, "bare").unwrap();
    assert_eq!(
        sd.keys(),
        ["num_batches_tracked", "running_mean", "running_var"]
    );
    let layers = sd.batchnorm_layers();
    assert_eq!(layers.len(), 1);
    assert_eq!((layers[0].prefix.as_str(), layers[0].affine), ("", false));
    assert_eq!(sd.config("").unwrap(), config);
    assert_eq!(sd.state("", &config).unwrap(), state);
}

// ---- errors ------------------------------------------------------------------

/// The tensors of resnet_bn.safetensors, to edit and write back.
fn edited(edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) -> StateDict {
    let bytes = std::fs::read(ck("resnet_bn.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    StateDict::from_bytes(out, "edited.safetensors").unwrap()
}

fn checkpoint_error(sd: &StateDict, prefix: &str, config: &BatchNormConfig) -> String {
    match sd.state(prefix, config) {
        Ok(_) => panic!("the edited checkpoint was accepted"),
        Err(e @ Error::Checkpoint { .. }) => e.to_string(),
        Err(e) => panic!("expected Error::Checkpoint, got {e:?}"),
    }
}

#[test]
fn wrong_shape() {
    let sd = edited(|t| {
        let w = t.get_mut("bn.weight").unwrap();
        w.1 = vec![7];
        w.2.truncate(28);
    });
    assert_eq!(
        checkpoint_error(&sd, "bn", &BatchNormConfig::new(8)),
        "checkpoint edited.safetensors: `bn.weight` has shape [7], expected [8] (num_features)"
    );
    // The right file, the wrong layer width.
    let msg = checkpoint_error(&resnet(), "layer2.0.bn1", &BatchNormConfig::new(8));
    assert!(
        msg.ends_with("`layer2.0.bn1.weight` has shape [16], expected [8] (num_features)"),
        "{msg}"
    );

    let sd = edited(|t| {
        let n = t.get_mut("bn.num_batches_tracked").unwrap();
        n.1 = vec![1, 1];
    });
    let msg = checkpoint_error(&sd, "bn", &BatchNormConfig::new(8));
    assert!(
        msg.ends_with("`bn.num_batches_tracked` has shape [1, 1], expected a scalar ()"),
        "{msg}"
    );
}

#[test]
fn missing_key() {
    let sd = edited(|t| {
        t.remove("layer1.1.bn2.running_var");
    });
    let msg = checkpoint_error(&sd, "layer1.1.bn2", &BatchNormConfig::new(8));
    assert!(
        msg.starts_with(
            "checkpoint edited.safetensors: missing key `layer1.1.bn2.running_var` (the layer has track_running_stats = true)"
        ),
        "{msg}"
    );

    let sd = edited(|t| {
        t.remove("bn.num_batches_tracked");
    });
    let msg = checkpoint_error(&sd, "bn", &BatchNormConfig::new(8));
    assert!(
        msg.contains("missing key `bn.num_batches_tracked`"),
        "{msg}"
    );

    // A prefix that is not there names those that are.
    let msg = checkpoint_error(&resnet(), "layer3.0.bn1", &BatchNormConfig::new(8));
    assert!(msg.contains("missing key `layer3.0.bn1.weight`"), "{msg}");
    assert!(
        msg.contains("(BatchNorm prefixes in the file: bn, layer1.0.bn1, layer1.0.bn2"),
        "{msg}"
    );
    let e = resnet().config("layer3.0.bn1").unwrap_err().to_string();
    assert!(
        e.contains("no BatchNorm layer at prefix \"layer3.0.bn1\""),
        "{e}"
    );
}

#[test]
fn wrong_dtype() {
    let sd = edited(|t| {
        let w = t.get_mut("bn.bias").unwrap();
        w.0 = Dtype::F64;
        w.2.extend_from_slice(&[0; 32]);
    });
    assert_eq!(
        checkpoint_error(&sd, "bn", &BatchNormConfig::new(8)),
        "checkpoint edited.safetensors: `bn.bias` has dtype F64, expected F32"
    );

    let sd = edited(|t| {
        let n = t.get_mut("bn.num_batches_tracked").unwrap();
        n.0 = Dtype::F32;
        n.2 = 5.0f32.to_le_bytes().to_vec();
    });
    assert_eq!(
        checkpoint_error(&sd, "bn", &BatchNormConfig::new(8)),
        "checkpoint edited.safetensors: `bn.num_batches_tracked` has dtype F32, expected I64"
    );

    let sd = edited(|t| {
        let n = t.get_mut("bn.num_batches_tracked").unwrap();
        n.2 = (-3i64).to_le_bytes().to_vec();
    });
    let msg = checkpoint_error(&sd, "bn", &BatchNormConfig::new(8));
    assert!(
        msg.ends_with("`bn.num_batches_tracked` is -3, expected a count >= 0"),
        "{msg}"
    );
}

#[test]
fn keys_the_configuration_rules_out() {
    let sd = resnet();
    let msg = checkpoint_error(&sd, "bn", &BatchNormConfig::new(8).with_affine(false));
    assert!(
        msg.ends_with("unexpected key `bn.weight`: the layer has affine = false"),
        "{msg}"
    );
    let msg = checkpoint_error(
        &sd,
        "bn",
        &BatchNormConfig::new(8).with_track_running_stats(false),
    );
    assert!(
        msg.ends_with(
            "unexpected key `bn.running_mean`: the layer has track_running_stats = false"
        ),
        "{msg}"
    );
}

#[test]
fn half_precision_parameters_widen_exactly() {
    let want = resnet().state("bn", &BatchNormConfig::new(8)).unwrap();
    let sd = edited(|t| {
        let w = t.get_mut("bn.weight").unwrap();
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(&w.2);
        w.0 = Dtype::F16;
        w.2 = v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
    });
    let got = sd.state("bn", &BatchNormConfig::new(8)).unwrap();
    let rounded: Vec<f32> = want
        .weight
        .as_ref()
        .unwrap()
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(got.weight.as_ref(), Some(&rounded));
    assert_eq!(got.running_var, want.running_var);
}

#[test]
fn unreadable_files() {
    let e = StateDict::open(ck("missing.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { action: "read", .. }), "{e:?}");
    assert!(e.to_string().contains("missing.safetensors"), "{e}");

    let e =
        StateDict::from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}".to_vec(), "junk").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("checkpoint junk: not a safetensors file"),
        "{e}"
    );

    let dir = std::env::temp_dir().join(format!("bnorm-no-dir-{}", std::process::id()));
    let e = checkpoint::save_state(
        dir.join("x/y.safetensors"),
        "bn",
        &BatchNormState::new(&BatchNormConfig::new(2)),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Io {
                action: "write",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn saving_refuses_inconsistent_states() {
    let mut state = BatchNormState::new(&BatchNormConfig::new(3));
    state.bias = Some(vec![0.0; 4]);
    let e = states_to_bytes(&[("bn", &state)], None).unwrap_err();
    assert!(
        e.to_string()
            .contains("vectors of different lengths [3, 4, 3, 3]"),
        "{e}"
    );
    let ok = BatchNormState::new(&BatchNormConfig::new(3));
    let e = states_to_bytes(&[("bn", &ok), ("bn.", &ok)], None).unwrap_err();
    assert!(
        e.to_string().contains("key `bn.weight` is written twice"),
        "{e}"
    );
}

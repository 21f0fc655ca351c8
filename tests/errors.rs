//! Every bad input is a clear `Err`, on every backend, and leaves the layer unchanged.

mod common;
use common::*;
use ndarray::ArrayD;
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference, Error, GpuBatchNorm,
    GpuContext, GpuTensor, Layout, Mode,
};

/// Everything observable about a layer.
fn snapshot(b: &dyn BatchNormBackend) -> (BatchNormState, Option<wgpu_batchnorm::SavedStats>) {
    (b.state().unwrap(), b.saved_stats().unwrap())
}

/// A trained layer on every backend (so saved statistics and running stats are non-trivial).
fn trained(config: &BatchNormConfig) -> (Vec<Box<dyn BatchNormBackend>>, ArrayD<f32>) {
    let mut r = rng(99);
    let state = random_state(&mut r, config, 2);
    let dims: Vec<usize> = match config.layout {
        Layout::ChannelsFirst => vec![2, config.num_features, 3],
        Layout::ChannelsLast => vec![2, 3, config.num_features],
    };
    let x = normal(&mut r, &dims, 0.0, 1.0);
    let mut bs = backends(config, &state);
    for b in &mut bs {
        b.forward_train(x.view()).unwrap();
    }
    assert_eq!(bs.len(), 1 + gpu_contexts().len());
    (bs, x)
}

/// Runs `call` on every backend; it must fail with an error matching `check`
/// whose message contains `needle`, and leave the layer as it was.
fn refuses(
    config: &BatchNormConfig,
    needle: &str,
    check: impl Fn(&Error) -> bool,
    call: impl Fn(&mut dyn BatchNormBackend) -> wgpu_batchnorm::Result<()>,
) {
    let (mut bs, _) = trained(config);
    for b in &mut bs {
        let before = snapshot(b.as_ref());
        let err = call(b.as_mut()).expect_err(&format!("{} accepted bad input", b.backend_name()));
        assert!(
            check(&err),
            "{}: unexpected error {err:?}",
            b.backend_name()
        );
        let msg = err.to_string();
        assert!(
            msg.contains(needle),
            "{}: message {msg:?} lacks {needle:?}",
            b.backend_name()
        );
        assert_eq!(
            snapshot(b.as_ref()),
            before,
            "{}: state changed by a failed call",
            b.backend_name()
        );
    }
}

fn zeros(dims: &[usize]) -> ArrayD<f32> {
    ArrayD::zeros(dims.to_vec())
}

#[test]
fn wrong_rank() {
    let cfg = BatchNormConfig::new(3);
    for dims in [vec![3], vec![1, 3, 1, 1, 1, 2]] {
        refuses(
            &cfg,
            "rank 2 to 5",
            |e| matches!(e, Error::Rank { .. }),
            |b| b.forward_train(zeros(&dims).view()).map(drop),
        );
        refuses(
            &cfg,
            "rank 2 to 5",
            |e| matches!(e, Error::Rank { .. }),
            |b| b.forward_eval(zeros(&dims).view()).map(drop),
        );
    }
    let last = BatchNormConfig::new(3).with_layout(Layout::ChannelsLast);
    refuses(
        &last,
        "rank 3 to 5",
        |e| matches!(e, Error::Rank { .. }),
        |b| b.forward_train(zeros(&[4, 3]).view()).map(drop),
    );
}

#[test]
fn channel_count_mismatch() {
    let cfg = BatchNormConfig::new(3);
    let is = |e: &Error| {
        matches!(
            e,
            Error::ChannelMismatch {
                expected: 3,
                got: 4,
                ..
            }
        )
    };
    refuses(&cfg, "3 features", is, |b| {
        b.forward_train(zeros(&[2, 4, 5]).view()).map(drop)
    });
    refuses(&cfg, "4 channels", is, |b| {
        b.forward_eval(zeros(&[2, 4, 5]).view()).map(drop)
    });
    refuses(&cfg, "4 channels", is, |b| {
        b.backward(
            zeros(&[2, 4, 3]).view(),
            zeros(&[2, 4, 3]).view(),
            Mode::Eval,
        )
        .map(drop)
    });
    let last = BatchNormConfig::new(3).with_layout(Layout::ChannelsLast);
    refuses(&last, "NHWC", is, |b| {
        b.forward_train(zeros(&[2, 3, 4]).view()).map(drop)
    });
}

#[test]
fn one_value_per_channel_in_training() {
    let is = |e: &Error| matches!(e, Error::SingleValuePerChannel { .. });
    let cfg = BatchNormConfig::new(4);
    refuses(&cfg, "more than 1 value per channel", is, |b| {
        b.forward_train(zeros(&[1, 4]).view()).map(drop)
    });
    refuses(&cfg, "more than 1 value per channel", is, |b| {
        b.forward_train(zeros(&[1, 4, 1, 1]).view()).map(drop)
    });
    // without tracked statistics evaluation uses batch statistics too
    let untracked = BatchNormConfig::new(4).with_track_running_stats(false);
    refuses(&untracked, "more than 1 value per channel", is, |b| {
        b.forward_eval(zeros(&[1, 4]).view()).map(drop)
    });
    // evaluation with running statistics takes a single sample
    let (mut bs, _) = trained(&cfg);
    for b in &mut bs {
        b.forward_eval(ArrayD::from_elem(vec![1, 4], 0.5).view())
            .unwrap();
    }
}

#[test]
fn empty_tensor() {
    let cfg = BatchNormConfig::new(3);
    let is = |e: &Error| matches!(e, Error::Empty { .. });
    refuses(&cfg, "no elements", is, |b| {
        b.forward_train(zeros(&[0, 3, 4]).view()).map(drop)
    });
    refuses(&cfg, "no elements", is, |b| {
        b.forward_eval(zeros(&[2, 3, 0]).view()).map(drop)
    });
}

#[test]
fn dy_shape_mismatch_and_missing_statistics() {
    let cfg = BatchNormConfig::new(3);
    refuses(
        &cfg,
        "dy has shape [2, 3, 4]",
        |e| matches!(e, Error::ShapeMismatch { .. }),
        |b| {
            b.backward(
                zeros(&[2, 3, 3]).view(),
                zeros(&[2, 3, 4]).view(),
                Mode::Train,
            )
            .map(drop)
        },
    );
    // the saved statistics are for [2, 3, 3]; another shape has none
    refuses(
        &cfg,
        "saved for shape [2, 3, 3]",
        |e| matches!(e, Error::NoSavedStatistics { .. }),
        |b| {
            b.backward(
                zeros(&[4, 3, 3]).view(),
                zeros(&[4, 3, 3]).view(),
                Mode::Train,
            )
            .map(drop)
        },
    );
    // a fresh layer has none at all
    let mut fresh: Vec<Box<dyn BatchNormBackend>> = backends(&cfg, &BatchNormState::new(&cfg));
    for b in &mut fresh {
        let e = b
            .backward(zeros(&[2, 3]).view(), zeros(&[2, 3]).view(), Mode::Train)
            .unwrap_err();
        assert!(matches!(e, Error::NoSavedStatistics { .. }), "{e:?}");
    }
}

#[test]
fn bad_configuration() {
    let bad = [
        (
            BatchNormConfig::new(3).with_eps(0.0),
            "eps must be finite and > 0",
        ),
        (
            BatchNormConfig::new(3).with_eps(-1e-5),
            "eps must be finite and > 0",
        ),
        (
            BatchNormConfig::new(3).with_eps(f64::NAN),
            "eps must be finite and > 0",
        ),
        (
            BatchNormConfig::new(3).with_eps(f64::INFINITY),
            "eps must be finite and > 0",
        ),
        (
            BatchNormConfig::new(3).with_eps(1e-50),
            "eps = 1e-50 is below the smallest normal f32",
        ),
        (
            BatchNormConfig::new(3).with_eps(1e-40),
            "eps = 1e-40 is below the smallest normal f32",
        ),
        (
            BatchNormConfig::new(3).with_eps(1e39),
            "is above the largest f32",
        ),
        (
            BatchNormConfig::new(3).with_momentum(Some(-0.1)),
            "momentum must lie in [0, 1]",
        ),
        (
            BatchNormConfig::new(3).with_momentum(Some(1.5)),
            "momentum must lie in [0, 1]",
        ),
        (
            BatchNormConfig::new(3).with_momentum(Some(f64::NAN)),
            "momentum must lie in [0, 1]",
        ),
        (BatchNormConfig::new(0), "num_features must be at least 1"),
    ];
    for (cfg, needle) in bad {
        let e = CpuReference::new(cfg.clone()).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
        for ctx in gpu_contexts() {
            let e = GpuBatchNorm::new(ctx, cfg.clone()).unwrap_err();
            assert!(e.to_string().contains(needle), "{}: {e}", ctx.label());
        }
    }
}

#[test]
fn bad_state() {
    let cfg = BatchNormConfig::new(3);
    let mut wrong_len = BatchNormState::new(&cfg);
    wrong_len.running_var = Some(vec![1.0; 2]);
    refuses(
        &cfg,
        "running_var has length 2, expected 3",
        |e| matches!(e, Error::ParameterLength { .. }),
        |b| b.set_state(&wrong_len),
    );
    let mut missing = BatchNormState::new(&cfg);
    missing.weight = None;
    refuses(
        &cfg,
        "weight does not exist",
        |e| matches!(e, Error::MissingParameter { .. }),
        |b| b.set_state(&missing),
    );
    let untracked = BatchNormConfig::new(3).with_track_running_stats(false);
    let extra = BatchNormState::new(&cfg);
    refuses(
        &untracked,
        "track_running_stats = false",
        |e| matches!(e, Error::MissingParameter { .. }),
        |b| b.set_state(&extra),
    );
}

/// The GPU-only refusals: tensors from another device, another layout, past the limits.
#[test]
fn gpu_tensor_errors() {
    let contexts = gpu_contexts();
    assert!(!contexts.is_empty() || !gpu_required());
    let Some(ctx) = contexts.first() else { return };
    // a second device on the same adapter is another device
    let other = GpuContext::from_adapter(
        &wgpu_batchnorm::gpu::enumerate_adapters(&Default::default())
            .into_iter()
            .find(|a| {
                a.get_info().name == ctx.name()
                    && a.get_info().backend == ctx.adapter_info().backend
            })
            .unwrap(),
    )
    .unwrap();
    let cfg = BatchNormConfig::new(3);
    let mut bn = GpuBatchNorm::new(ctx, cfg.clone()).unwrap();
    let mut r = rng(5);
    let x = normal(&mut r, &[2, 3, 4], 0.0, 1.0);
    let gx = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
    let fwd = bn.run_forward_train(&gx).unwrap();
    let before = (bn.state().unwrap(), fwd.saved.read().unwrap());

    let foreign = GpuTensor::from_array(&other, x.view(), Layout::ChannelsFirst).unwrap();
    let e = bn.run_forward_train(&foreign).unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("x lives on device"), "{e}");
    let e = bn.run_backward(&gx, &foreign, &fwd.saved).unwrap_err();
    assert!(e.to_string().contains("dy lives on device"), "{e}");

    let nhwc = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsLast).unwrap();
    let e = bn.run_forward_eval(&nhwc).unwrap_err();
    assert!(matches!(e, Error::LayoutMismatch { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("x is NHWC, the BatchNorm expects NCHW"),
        "{e}"
    );

    let wrong_y = GpuTensor::uninit(ctx, &[2, 3, 5], Layout::ChannelsFirst).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let e = bn
        .record_forward_train(&mut enc, &gx, &wrong_y, None)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("y has shape [2, 3, 5], expected [2, 3, 4]"),
        "{e}"
    );

    // past the device's buffer limit: refused before anything is allocated
    // (past one storage binding is fine: BatchNorm binds it in chunks)
    let limit = ctx.limits().max_buffer_size as usize;
    let e = GpuTensor::uninit(ctx, &[limit / 4 + 1, 1], Layout::ChannelsFirst).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert!(e.to_string().contains("max_buffer_size"), "{e}");
    // past u32 element indexing: refused by the shape check
    let e = wgpu_batchnorm::ChannelWalk::new(&[1 << 20, 3, 1 << 12], Layout::ChannelsFirst)
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");

    let e = GpuTensor::from_slice(ctx, &[1.0; 5], &[2, 3], Layout::ChannelsFirst).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");

    assert_eq!((bn.state().unwrap(), fwd.saved.read().unwrap()), before);
    assert_eq!(bn.num_batches_tracked().unwrap(), Some(1));
}

#[test]
fn no_adapter_error_says_how_to_get_one() {
    let sel = wgpu_batchnorm::AdapterSelection::default().with_name("no adapter is called this");
    let e = GpuContext::with_selection(&sel).unwrap_err();
    assert!(matches!(e, Error::NoAdapter { .. }));
    assert!(e.to_string().contains("mesa-vulkan-drivers"), "{e}");
    assert!(e.to_string().contains("no adapter is called this"), "{e}");
}

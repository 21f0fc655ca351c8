//! The fused BatchNorm `y = act(BN(x) + z)` on the CPU backends: the fast
//! CPU backend against the f64 reference for every fusion, mode, layout,
//! storage type and walk; the fused ops against the unfused composition;
//! and the errors of a wrong `z`, `y` or `dz`, which leave the layer as it was.

mod common;
use common::*;
use ndarray::{ArrayD, Axis};
use wgpu_batchnorm::*;

/// f16 tolerance of shared/FIXTURES.md, for the tensors stored in f16.
const TOL_F16: f32 = 5e-3;

/// What one backend computes for one fused case, by name. Both backward
/// calls get `y_in` / `y_eval_in` (the reference's outputs), so that both
/// backends gate by the same mask.
fn run_fused(
    b: &mut dyn BatchNormBackend,
    x: &ArrayD<f32>,
    z: Option<&ArrayD<f32>>,
    dy: &ArrayD<f32>,
    fusion: Fusion,
    y_in: Option<(&ArrayD<f32>, &ArrayD<f32>)>,
) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = Vec::new();
    let mut push = |k: &str, v: Vec<f32>| out.push((k.to_string(), v));
    let act = fusion.activation;
    let y = b
        .forward_fused(x.view(), z.map(|z| z.view()), act, Mode::Train)
        .unwrap();
    let s = b
        .saved_stats()
        .unwrap()
        .expect("saved by the training forward");
    push("save_mean", s.mean);
    push("save_invstd", s.invstd);
    let st = b.state().unwrap();
    push("running_mean", st.running_mean.unwrap_or_default());
    push("running_var", st.running_var.unwrap_or_default());
    let nbt = st.num_batches_tracked.map_or(vec![], |n| vec![n as f32]);
    push("num_batches_tracked", nbt);
    let y_for_backward = y_in.map_or(&y, |(y, _)| y);
    let g = b
        .backward_fused(
            x.view(),
            y_for_backward.view(),
            dy.view(),
            fusion,
            Mode::Train,
        )
        .unwrap();
    push("dx", flat(&g.dx));
    assert_eq!(g.dz.is_some(), fusion.residual, "dz with a residual only");
    push("dz", g.dz.as_ref().map(flat).unwrap_or_default());
    push("dweight", g.dweight.unwrap_or_default());
    push("dbias", g.dbias.unwrap_or_default());
    push("y", flat(&y));
    let ye = b
        .forward_fused(x.view(), z.map(|z| z.view()), act, Mode::Eval)
        .unwrap();
    let ye_for_backward = y_in.map_or(&ye, |(_, ye)| ye);
    let g = b
        .backward_fused(
            x.view(),
            ye_for_backward.view(),
            dy.view(),
            fusion,
            Mode::Eval,
        )
        .unwrap();
    push("dx_eval", flat(&g.dx));
    push("dz_eval", g.dz.as_ref().map(flat).unwrap_or_default());
    push("dweight_eval", g.dweight.unwrap_or_default());
    push("dbias_eval", g.dbias.unwrap_or_default());
    push("y_eval", flat(&ye));
    out
}

/// The tensors stored in the storage type.
fn is_big(name: &str) -> bool {
    ["y", "dx", "dz"].iter().any(|p| name.starts_with(p))
}

/// Runs one fused case on the reference and the fast CPU backend (both
/// storing `dtype`) and compares every output; `Err` names each one out of
/// tolerance.
#[allow(clippy::too_many_arguments)]
fn compare_fused(
    case: &str,
    cfg: &BatchNormConfig,
    st: &BatchNormState,
    dtype: DType,
    x: &ArrayD<f32>,
    z: Option<&ArrayD<f32>>,
    dy: &ArrayD<f32>,
    fusion: Fusion,
) -> Result<(), String> {
    let mut reference = CpuReference::new(cfg.clone()).unwrap();
    let mut fast = CpuBatchNorm::new(cfg.clone()).unwrap();
    for b in [&mut reference as &mut dyn BatchNormBackend, &mut fast] {
        b.set_state(st).unwrap();
        b.set_storage_dtype(dtype).unwrap();
    }
    let want = run_fused(&mut reference, x, z, dy, fusion, None);
    let get = |k: &str| {
        let v = &want.iter().find(|(n, _)| n == k).unwrap().1;
        ArrayD::from_shape_vec(x.raw_dim(), v.clone()).unwrap()
    };
    let (y, ye) = (get("y"), get("y_eval"));
    let got = run_fused(&mut fast, x, z, dy, fusion, Some((&y, &ye)));
    let mut bad = Vec::new();
    for ((k, g), (_, w)) in got.iter().zip(&want) {
        let tol = if is_big(k) && dtype == DType::F16 {
            TOL_F16
        } else {
            TOL
        };
        if let Err(e) = all_close(k, g, w, tol, tol) {
            bad.push(format!("{case}: {e}"));
        }
        if is_big(k) && dtype == DType::F16 {
            let not_f16 = g
                .iter()
                .filter(|&&v| !v.is_nan() && DType::F16.round(v) != v);
            assert_eq!(not_f16.count(), 0, "{case} {k}: outputs are not f16 values");
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("\n"))
    }
}

/// Every walk of the fast backend: rows (`(N, C)`, short spatial sizes,
/// channels-last), blocks (7x7 runs, a 3-D volume), channels (long runs, a
/// channel cut over two tasks).
fn shapes() -> Vec<(&'static str, Vec<usize>, Layout)> {
    let (first, last) = (Layout::ChannelsFirst, Layout::ChannelsLast);
    vec![
        ("nc", vec![64, 12], first),
        ("ncl_short", vec![9, 6, 5], first),
        ("nchw_7x7", vec![4, 10, 7, 7], first),
        ("nchw_long", vec![3, 1, 50, 60], first),
        ("nhwc", vec![4, 5, 6, 8], last),
        ("ncdhw", vec![2, 3, 4, 5, 6], first),
        ("ndhwc", vec![2, 3, 4, 5, 6], last),
    ]
}

fn channels(dims: &[usize], layout: Layout) -> usize {
    match layout {
        Layout::ChannelsFirst => dims[1],
        Layout::ChannelsLast => dims[dims.len() - 1],
    }
}

#[test]
fn fast_cpu_matches_the_reference_for_every_fusion_mode_layout_and_dtype() {
    let mut r = rng(41);
    let mut failures = Vec::new();
    let mut cases = 0;
    for (name, dims, layout) in shapes() {
        let base = BatchNormConfig::new(channels(&dims, layout)).with_layout(layout);
        let configs = [
            ("default", base.clone()),
            (
                "affine_off_momentum_none",
                base.clone().with_affine(false).with_momentum(None),
            ),
            ("no_tracking", base.clone().with_track_running_stats(false)),
        ];
        for (cname, cfg) in configs {
            let st = random_state(&mut r, &cfg, 2);
            let x = normal(&mut r, &dims, 0.4, 1.7);
            let z = normal(&mut r, &dims, -0.2, 1.0);
            let dy = normal(&mut r, &dims, 0.0, 1.0);
            for fusion in Fusion::ALL {
                let z = fusion.residual.then_some(&z);
                for dtype in [DType::F32, DType::F16] {
                    cases += 1;
                    let case = format!("{name} {dims:?} {cname} {} {dtype}", fusion.name());
                    if let Err(e) = compare_fused(&case, &cfg, &st, dtype, &x, z, &dy, fusion) {
                        failures.push(e);
                    }
                }
            }
        }
    }
    assert_eq!(cases, 7 * 3 * 4 * 2);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_nan_stays_in_its_channel_and_the_relu_lets_its_gradient_through() {
    let dims = [4, 3, 5, 6];
    let cfg = BatchNormConfig::new(3);
    let mut r = rng(42);
    let st = random_state(&mut r, &cfg, 0);
    let mut x = normal(&mut r, &dims, 0.0, 1.0);
    x[[1, 1, 2, 2]] = f32::NAN;
    let z = normal(&mut r, &dims, 0.0, 1.0);
    let dy = normal(&mut r, &dims, 0.0, 1.0);
    let fusion = Fusion::new(true, Activation::Relu);
    for dtype in [DType::F32, DType::F16] {
        compare_fused("nan", &cfg, &st, dtype, &x, Some(&z), &dy, fusion).unwrap();
    }
    let mut bn = CpuBatchNorm::new(cfg).unwrap();
    bn.set_state(&st).unwrap();
    let y = bn
        .forward_fused(x.view(), Some(z.view()), Activation::Relu, Mode::Train)
        .unwrap();
    for c in 0..3 {
        let nan = y
            .index_axis(Axis(1), c)
            .iter()
            .filter(|v| v.is_nan())
            .count();
        assert_eq!(nan, if c == 1 { 30 * 4 } else { 0 }, "channel {c}");
    }
    let g = bn
        .backward_fused(x.view(), y.view(), dy.view(), fusion, Mode::Train)
        .unwrap();
    let dz = g.dz.unwrap();
    // Where y is NaN the gradient passes: dz = dy over the whole channel.
    assert_eq!(dz.index_axis(Axis(1), 1), dy.index_axis(Axis(1), 1));
    assert!(dz.index_axis(Axis(1), 0).iter().any(|&v| v == 0.0));
    assert!(g.dx.index_axis(Axis(1), 1).iter().all(|v| v.is_nan()));
    assert!(g.dx.index_axis(Axis(1), 0).iter().all(|v| v.is_finite()));
}

/// `act(v + z)` on plain outputs, in `f32`.
fn compose(y: &ArrayD<f32>, z: Option<&ArrayD<f32>>, act: Activation) -> ArrayD<f32> {
    let mut out = y.clone();
    if let Some(z) = z {
        out += z;
    }
    out.mapv(|v| act.apply(v))
}

#[test]
fn fused_f32_equals_the_unfused_composition_bit_for_bit() {
    // The fast backend's fused passes are its plain ones with the add and
    // the activation in the same loop: in f32 the results are identical.
    let mut r = rng(43);
    for (name, dims, layout) in shapes() {
        let cfg = BatchNormConfig::new(channels(&dims, layout)).with_layout(layout);
        let st = random_state(&mut r, &cfg, 1);
        let x = normal(&mut r, &dims, 0.4, 1.7);
        let z = normal(&mut r, &dims, -0.2, 1.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        for fusion in Fusion::ALL {
            let z = fusion.residual.then_some(&z);
            let act = fusion.activation;
            for mode in [Mode::Train, Mode::Eval] {
                let case = format!("{name} {} {mode:?}", fusion.name());
                let (mut fused, mut plain) = (
                    CpuBatchNorm::new(cfg.clone()).unwrap(),
                    CpuBatchNorm::new(cfg.clone()).unwrap(),
                );
                fused.set_state(&st).unwrap();
                plain.set_state(&st).unwrap();
                let y = fused
                    .forward_fused(x.view(), z.map(|z| z.view()), act, mode)
                    .unwrap();
                let bn = match mode {
                    Mode::Train => BatchNormBackend::forward_train(&mut plain, x.view()),
                    Mode::Eval => BatchNormBackend::forward_eval(&mut plain, x.view()),
                }
                .unwrap();
                assert_eq!(flat(&y), flat(&compose(&bn, z, act)), "{case}: y");
                assert_eq!(fused.state(), plain.state(), "{case}: state");
                let g = fused
                    .backward_fused(x.view(), y.view(), dy.view(), fusion, mode)
                    .unwrap();
                let gated = ndarray::Zip::from(&y)
                    .and(&dy)
                    .map_collect(|&y, &d| act.gate(y, d));
                let p =
                    BatchNormBackend::backward(&mut plain, x.view(), gated.view(), mode).unwrap();
                assert_eq!(flat(&g.dx), flat(&p.dx), "{case}: dx");
                assert_eq!(g.dweight, p.dweight, "{case}: dweight");
                assert_eq!(g.dbias, p.dbias, "{case}: dbias");
                if fusion.residual {
                    assert_eq!(g.dz.as_ref().map(flat), Some(flat(&gated)), "{case}: dz");
                }
            }
        }
    }
}

#[test]
fn slice_methods_overwrite_poisoned_outputs_and_match_the_ndarray_interface() {
    // dx and dz start as NaN: the gated dy written into dx (no residual) and
    // the dx pass over it in place must leave no trace of the poison.
    let mut r = rng(44);
    for (name, dims, layout) in shapes() {
        let cfg = BatchNormConfig::new(channels(&dims, layout)).with_layout(layout);
        let c = cfg.num_features;
        let x = normal(&mut r, &dims, 0.0, 1.0);
        let z = normal(&mut r, &dims, 0.0, 1.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        for fusion in Fusion::ALL {
            let act = fusion.activation;
            let zs = fusion.residual.then(|| flat(&z));
            let mut bn = CpuBatchNorm::new(cfg.clone()).unwrap();
            let mut y = vec![f32::NAN; x.len()];
            bn.forward_fused_slice(&flat(&x), zs.as_deref(), &dims, act, Mode::Train, &mut y)
                .unwrap();
            let (mut dx, mut dz) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
            let (mut dw, mut db) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            let dz_out = fusion.residual.then_some(&mut dz[..]);
            bn.backward_fused_slice(
                &flat(&x),
                &y,
                &flat(&dy),
                &dims,
                act,
                Mode::Train,
                &mut dx,
                dz_out,
                &mut dw,
                &mut db,
            )
            .unwrap();
            let mut nd = CpuBatchNorm::new(cfg.clone()).unwrap();
            let want_y = nd
                .forward_fused(
                    x.view(),
                    fusion.residual.then(|| z.view()),
                    act,
                    Mode::Train,
                )
                .unwrap();
            let want = nd
                .backward_fused(x.view(), want_y.view(), dy.view(), fusion, Mode::Train)
                .unwrap();
            let case = format!("{name} {}", fusion.name());
            assert_eq!(y, flat(&want_y), "{case}: y");
            assert_eq!(dx, flat(&want.dx), "{case}: dx");
            assert!(dx.iter().all(|v| v.is_finite()), "{case}: dx");
            assert_eq!(Some(dw), want.dweight, "{case}: dweight");
            assert_eq!(Some(db), want.dbias, "{case}: dbias");
            match want.dz {
                Some(w) => assert_eq!(dz, flat(&w), "{case}: dz"),
                None => assert!(dz.iter().all(|v| v.is_nan()), "{case}: dz untouched"),
            }
        }
    }
}

/// Everything a failed call must leave as it was.
fn snapshot(b: &dyn BatchNormBackend) -> (BatchNormState, Option<SavedStats>) {
    (b.state().unwrap(), b.saved_stats().unwrap())
}

#[test]
fn a_wrong_z_y_or_dy_is_named_and_changes_nothing() {
    let dims = [4, 3, 5];
    let cfg = BatchNormConfig::new(3);
    let mut r = rng(45);
    let st = random_state(&mut r, &cfg, 5);
    let x = normal(&mut r, &dims, 0.0, 1.0);
    let dy = normal(&mut r, &dims, 0.0, 1.0);
    // Same element count, other shape; and a wrong count.
    let z_t = normal(&mut r, &[4, 5, 3], 0.0, 1.0);
    let z_short = normal(&mut r, &[4, 3, 4], 0.0, 1.0);
    let fusion = Fusion::new(true, Activation::Relu);
    let backends: Vec<Box<dyn BatchNormBackend>> = vec![
        Box::new(CpuReference::new(cfg.clone()).unwrap()),
        Box::new(CpuBatchNorm::new(cfg.clone()).unwrap()),
    ];
    for mut b in backends {
        let name = b.backend_name();
        b.set_state(&st).unwrap();
        // A first training step, so that saved statistics exist to be kept.
        let y = b
            .forward_fused(x.view(), None, Activation::Relu, Mode::Train)
            .unwrap();
        for mode in [Mode::Train, Mode::Eval] {
            for bad in [&z_t, &z_short] {
                let before = snapshot(b.as_ref());
                let e = b
                    .forward_fused(x.view(), Some(bad.view()), Activation::Relu, mode)
                    .unwrap_err();
                assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e}");
                let msg = e.to_string();
                assert!(msg.contains("z has shape"), "{name}: {msg}");
                assert!(msg.contains(&format!("{:?}", bad.shape())), "{name}: {msg}");
                assert_eq!(
                    snapshot(b.as_ref()),
                    before,
                    "{name} {mode:?}: state changed"
                );

                let e = b
                    .backward_fused(x.view(), bad.view(), dy.view(), fusion, mode)
                    .unwrap_err();
                assert!(e.to_string().contains("y has shape"), "{name}: {e}");
                let e = b
                    .backward_fused(x.view(), y.view(), bad.view(), fusion, mode)
                    .unwrap_err();
                assert!(e.to_string().contains("dy has shape"), "{name}: {e}");
                assert_eq!(
                    snapshot(b.as_ref()),
                    before,
                    "{name} {mode:?}: state changed"
                );
            }
        }
        // A wrong x (5 channels) is named before z.
        let e = b
            .forward_fused(
                z_t.view(),
                Some(z_short.view()),
                Activation::Identity,
                Mode::Train,
            )
            .unwrap_err();
        assert!(matches!(e, Error::ChannelMismatch { .. }), "{name}: {e}");
    }
}

#[test]
fn slice_errors_name_the_slice_and_write_nothing() {
    let dims = [4, 3, 5];
    let cfg = BatchNormConfig::new(3);
    let mut r = rng(46);
    let x = flat(&normal(&mut r, &dims, 0.0, 1.0));
    let mut bn = CpuBatchNorm::new(cfg).unwrap();
    let mut y = vec![0.0f32; 60];
    let z = vec![1.0f32; 59];
    let e = bn
        .forward_fused_slice(&x, Some(&z), &dims, Activation::Relu, Mode::Train, &mut y)
        .unwrap_err();
    assert!(e.to_string().contains("z (a slice of 59 elements)"), "{e}");
    assert!(bn.saved_stats().is_none());
    assert_eq!(bn.state().num_batches_tracked, Some(0));
    assert!(y.iter().all(|&v| v == 0.0));

    bn.forward_fused_slice(&x, None, &dims, Activation::Relu, Mode::Train, &mut y)
        .unwrap();
    let dy = vec![1.0f32; 60];
    let (mut dx, mut dw, mut db) = (vec![7.0f32; 60], vec![7.0f32; 3], vec![7.0f32; 3]);
    let mut dz = vec![7.0f32; 61];
    let e = bn
        .backward_fused_slice(
            &x,
            &y,
            &dy,
            &dims,
            Activation::Relu,
            Mode::Train,
            &mut dx,
            Some(&mut dz),
            &mut dw,
            &mut db,
        )
        .unwrap_err();
    assert!(e.to_string().contains("dz (a slice of 61 elements)"), "{e}");
    let e = bn
        .backward_fused_slice(
            &x,
            &y[..59],
            &dy,
            &dims,
            Activation::Relu,
            Mode::Train,
            &mut dx,
            None,
            &mut dw,
            &mut db,
        )
        .unwrap_err();
    assert!(e.to_string().contains("y (a slice of 59 elements)"), "{e}");
    assert!(
        dx.iter()
            .chain(&dw)
            .chain(&db)
            .chain(&dz)
            .all(|&v| v == 7.0)
    );
}

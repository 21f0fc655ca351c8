//! The fast CPU backend (`CpuBatchNorm`, f32 + rayon) against the f64
//! reference (`CpuReference`), op by op, at the f32 tolerance.

mod common;
use common::*;
use ndarray::ArrayD;
use proptest::prelude::*;
use wgpu_batchnorm::*;

/// Everything a backend computes for one input, in a fixed order: evaluation
/// with the initial running statistics, training forward, saved statistics,
/// backward in both modes, a second training step and evaluation after it.
fn run_ops(
    b: &mut dyn BatchNormBackend,
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = Vec::new();
    let mut push = |k: &str, v: Vec<f32>| out.push((k.to_string(), v));
    push("y_eval", flat(&b.forward_eval(x.view()).unwrap()));
    let g = b.backward(x.view(), dy.view(), Mode::Eval).unwrap();
    push("dx_eval", flat(&g.dx));
    push("dweight_eval", g.dweight.unwrap_or_default());
    push("dbias_eval", g.dbias.unwrap_or_default());
    push("y", flat(&b.forward_train(x.view()).unwrap()));
    let s = b.saved_stats().unwrap().expect("saved after forward_train");
    push("save_mean", s.mean);
    push("save_invstd", s.invstd);
    let g = b.backward(x.view(), dy.view(), Mode::Train).unwrap();
    push("dx", flat(&g.dx));
    push("dweight", g.dweight.unwrap_or_default());
    push("dbias", g.dbias.unwrap_or_default());
    let x2 = x.mapv(|v| 0.5 * v + 1.0);
    push("y_step2", flat(&b.forward_train(x2.view()).unwrap()));
    let st = b.state().unwrap();
    push("running_mean", st.running_mean.unwrap_or_default());
    push("running_var", st.running_var.unwrap_or_default());
    push(
        "num_batches_tracked",
        st.num_batches_tracked
            .map(|n| vec![n as f32])
            .unwrap_or_default(),
    );
    push("y_eval_after", flat(&b.forward_eval(x.view()).unwrap()));
    out
}

/// Compares `CpuBatchNorm` with `CpuReference` on `x`, `dy`; `Err` names every
/// output out of tolerance.
fn compare(
    case: &str,
    cfg: &BatchNormConfig,
    st: &BatchNormState,
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
) -> Result<(), String> {
    let mut reference = CpuReference::new(cfg.clone()).unwrap();
    let mut fast = CpuBatchNorm::new(cfg.clone()).unwrap();
    reference.set_state(st).unwrap();
    BatchNormBackend::set_state(&mut fast, st).unwrap();
    let want = run_ops(&mut reference, x, dy);
    let got = run_ops(&mut fast, x, dy);
    let mut bad = Vec::new();
    for ((k, g), (_, w)) in got.iter().zip(&want) {
        if let Err(e) = all_close(k, g, w, TOL, TOL) {
            bad.push(format!("{case}: {e}"));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("\n"))
    }
}

fn configs(c: usize, layout: Layout) -> Vec<(&'static str, BatchNormConfig)> {
    let base = BatchNormConfig::new(c).with_layout(layout);
    vec![
        ("default", base.clone()),
        ("affine_off", base.clone().with_affine(false)),
        ("no_tracking", base.clone().with_track_running_stats(false)),
        ("momentum_none", base.clone().with_momentum(None)),
        (
            "eps_1e-3_momentum_0.7",
            base.with_eps(1e-3).with_momentum(Some(0.7)),
        ),
    ]
}

/// Logical `(N, C, *S)` to the dims of `layout`.
fn dims_for(logical: &[usize], layout: Layout) -> Vec<usize> {
    match layout {
        Layout::ChannelsFirst => logical.to_vec(),
        Layout::ChannelsLast => {
            let mut d = vec![logical[0]];
            d.extend_from_slice(&logical[2..]);
            d.push(logical[1]);
            d
        }
    }
}

fn layouts_for(rank: usize) -> Vec<Layout> {
    if rank >= 3 {
        vec![Layout::ChannelsFirst, Layout::ChannelsLast]
    } else {
        vec![Layout::ChannelsFirst]
    }
}

/// Runs `f` on a rayon pool of `threads` threads, so that the task split
/// does not depend on this machine's core count.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn every_op_rank_layout_and_config_matches_the_reference() {
    let shapes: &[&[usize]] = &[
        &[7, 3],
        &[5, 4, 9],
        &[3, 5, 7, 3],
        &[2, 3, 3, 5, 4],
        &[4, 2, 33],
        &[2, 3, 17, 19],
    ];
    let mut r = rng(11);
    let mut failures = Vec::new();
    let mut cases = 0;
    for logical in shapes {
        for layout in layouts_for(logical.len()) {
            let dims = dims_for(logical, layout);
            for (name, cfg) in configs(logical[1], layout) {
                let st = random_state(&mut r, &cfg, 3);
                let x = normal(&mut r, &dims, 0.7, 1.9);
                let dy = normal(&mut r, &dims, 0.1, 1.0);
                cases += 1;
                if let Err(e) = compare(&format!("{dims:?} {layout} {name}"), &cfg, &st, &x, &dy) {
                    failures.push(e);
                }
            }
        }
    }
    assert_eq!(cases, 55);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn large_mean_matches_without_cancellation() {
    // 300 + N(0,1): E[x^2]-E[x]^2 in f32 would lose every digit of the variance.
    let mut r = rng(12);
    for (logical, threads) in [
        (&[16usize, 4, 9, 11][..], 2),
        (&[600, 8][..], 3),
        (&[2, 3, 50_000][..], 8),
    ] {
        for layout in layouts_for(logical.len()) {
            let dims = dims_for(logical, layout);
            let cfg = BatchNormConfig::new(logical[1]).with_layout(layout);
            let st = random_state(&mut r, &cfg, 0);
            let x = normal(&mut r, &dims, 300.0, 1.0);
            let dy = normal(&mut r, &dims, 0.0, 1.0);
            with_threads(threads, || {
                compare(&format!("large mean {dims:?} {layout}"), &cfg, &st, &x, &dy)
            })
            .unwrap();
        }
    }
}

#[test]
fn constant_channel_normalizes_to_the_bias() {
    let mut r = rng(13);
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let dims = dims_for(&[6, 3, 5, 7], layout);
        let cfg = BatchNormConfig::new(3).with_layout(layout);
        let st = random_state(&mut r, &cfg, 1);
        let mut x = normal(&mut r, &dims, 0.0, 1.0);
        let ch_axis = if layout == Layout::ChannelsFirst {
            1
        } else {
            3
        };
        x.index_axis_mut(ndarray::Axis(ch_axis), 1).fill(0.1);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        compare(&format!("constant channel {layout}"), &cfg, &st, &x, &dy).unwrap();
        let mut bn = CpuBatchNorm::new(cfg.clone()).unwrap();
        bn.set_state(&st).unwrap();
        let y = BatchNormBackend::forward_train(&mut bn, x.view()).unwrap();
        let bias = st.bias.as_ref().unwrap()[1];
        // invstd = 1/sqrt(eps) ~ 316 amplifies any error in the mean.
        let worst = y
            .index_axis(ndarray::Axis(ch_axis), 1)
            .iter()
            .map(|&v| (v - bias).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "constant channel: |y - bias| up to {worst}");
        let rv = bn.state().running_var.as_ref().unwrap()[1];
        let want = 0.9 * st.running_var.as_ref().unwrap()[1];
        assert!((rv - want).abs() <= 1e-6, "running_var {rv} vs {want}");
    }
}

#[test]
fn split_channels_and_row_blocks_match_the_reference() {
    // Shapes big enough that one channel is cut into several tasks (channel-major
    // walk) and that the row walk uses several row tasks and column blocks.
    let mut r = rng(14);
    let cases: &[(&[usize], Layout)] = &[
        (&[3, 2, 30_000], Layout::ChannelsFirst), // 2 channels of 90000: split
        (&[130, 5000], Layout::ChannelsFirst),    // BatchNorm1d: 2 column blocks
        (&[260, 3, 4100], Layout::ChannelsLast),  // NLC: 2 column blocks, row tasks
        (&[2000, 3, 5], Layout::ChannelsFirst),   // spatial 5 < 16: row walk with inner > 1
        (&[4, 7, 49], Layout::ChannelsFirst),     // 7x7 runs
    ];
    for &(dims, layout) in cases {
        let c = if layout == Layout::ChannelsFirst {
            dims[1]
        } else {
            dims[dims.len() - 1]
        };
        let cfg = BatchNormConfig::new(c).with_layout(layout);
        let st = random_state(&mut r, &cfg, 0);
        let x = normal(&mut r, dims, -2.0, 3.0);
        let dy = normal(&mut r, dims, 0.0, 1.0);
        for threads in [1, 8] {
            with_threads(threads, || {
                compare(
                    &format!("{dims:?} {layout} on {threads} threads"),
                    &cfg,
                    &st,
                    &x,
                    &dy,
                )
            })
            .unwrap();
        }
    }
}

#[test]
fn blocks_centred_on_running_means_match_the_reference_on_drifting_data() {
    // Inputs for every walk (row walk: BatchNorm1d, NHWC; block walk: 7x7;
    // channel walk) with several blocks or pieces per task, whose values drift
    // by many standard deviations in memory order (sorted batches), or do
    // not: later blocks are centred on the running means and must fall back
    // to two passes where they no longer fit.
    let mut r = rng(16);
    for (dims, layout) in [
        (&[5000usize, 6][..], Layout::ChannelsFirst),
        (&[40, 10, 10, 6][..], Layout::ChannelsLast),
        (&[400, 6, 7, 7][..], Layout::ChannelsFirst),
        (&[10, 6, 60, 60][..], Layout::ChannelsFirst),
    ] {
        let cfg = BatchNormConfig::new(6).with_layout(layout);
        let st = random_state(&mut r, &cfg, 0);
        let base = normal(&mut r, dims, 300.0, 1.0);
        let len = base.len() as f32;
        for drift in [0.0f32, 40.0] {
            let mut x = base.clone();
            for (i, v) in x.iter_mut().enumerate() {
                *v += drift * i as f32 / len;
            }
            let dy = normal(&mut r, dims, 0.0, 1.0);
            for threads in [1, 3] {
                with_threads(threads, || {
                    compare(
                        &format!("drift {drift} {dims:?} {layout} on {threads} threads"),
                        &cfg,
                        &st,
                        &x,
                        &dy,
                    )
                })
                .unwrap();
            }
        }
    }
}

#[test]
fn channel_resident_backward_matches_the_reference() {
    // Channel-major shapes with at least two channels per thread, whose
    // backward runs channel by channel with the channel in cache: every
    // config (both backward modes), small and large means, data drifting
    // within a channel.
    let mut r = rng(17);
    let cases: &[(&[usize], usize, f32)] = &[
        (&[6, 8, 40, 40], 4, 0.5),
        (&[3, 6, 1100], 1, 300.0),
        (&[5, 4, 33, 50], 2, -3.0),
    ];
    for &(dims, threads, mean) in cases {
        for (name, cfg) in configs(dims[1], Layout::ChannelsFirst) {
            let st = random_state(&mut r, &cfg, 1);
            let mut x = normal(&mut r, dims, mean, 1.5);
            let len = x.len() as f32;
            for (i, v) in x.iter_mut().enumerate() {
                *v += 20.0 * i as f32 / len;
            }
            let dy = normal(&mut r, dims, 0.2, 1.0);
            let case = format!("{dims:?} {name} on {threads} threads");
            with_threads(threads, || compare(&case, &cfg, &st, &x, &dy)).unwrap();
        }
    }
}

#[test]
fn channel_resident_non_finite_values_match_the_reference() {
    // A channel-major shape whose passes run a channel at a time in cache:
    // a NaN (channel 0), +inf (channel 1), +inf and -inf (channel 2) give
    // PyTorch's statistics there and leave the other channels finite.
    let dims = [2, 5, 32, 40];
    let cfg = BatchNormConfig::new(5);
    let mut r = rng(19);
    let st = random_state(&mut r, &cfg, 1);
    let mut x = normal(&mut r, &dims, 1.0, 2.0);
    let dy = normal(&mut r, &dims, 0.0, 1.0);
    let at = |c: usize, i: usize| (i / 1280 * 5 + c) * 1280 + i % 1280;
    let xs = x.as_slice_mut().unwrap();
    xs[at(0, 1500)] = f32::NAN;
    xs[at(1, 7)] = f32::INFINITY;
    xs[at(2, 100)] = f32::INFINITY;
    xs[at(2, 2000)] = f32::NEG_INFINITY;
    for threads in [1, 2] {
        let case = format!("non-finite in cache on {threads} threads");
        with_threads(threads, || compare(&case, &cfg, &st, &x, &dy)).unwrap();
    }
    let mut bn = CpuBatchNorm::new(cfg).unwrap();
    let y = BatchNormBackend::forward_train(&mut bn, x.view()).unwrap();
    let s = bn.saved_stats().unwrap();
    assert!(s.mean[0].is_nan() && s.mean[2].is_nan(), "{:?}", s.mean);
    assert_eq!(s.mean[1], f32::INFINITY);
    let ys = y.as_slice().unwrap();
    assert!((0..2560).all(|i| ys[at(3, i)].is_finite() && ys[at(4, i)].is_finite()));
}

#[test]
fn channel_resident_fused_passes_match_the_reference() {
    // The fused forward (residual, ReLU) and backward where the channels
    // are walked one at a time in cache, on 1 and 3 threads.
    let mut r = rng(18);
    let dims = [3, 6, 30, 40];
    let cfg = BatchNormConfig::new(6);
    let st = random_state(&mut r, &cfg, 1);
    let x = normal(&mut r, &dims, 2.0, 1.5);
    let z = normal(&mut r, &dims, 0.0, 1.0);
    let dy = normal(&mut r, &dims, 0.0, 1.0);
    for threads in [1, 3] {
        for fusion in [
            Fusion::new(true, Activation::Relu),
            Fusion::new(false, Activation::Relu),
            Fusion::new(true, Activation::Identity),
        ] {
            let zv = fusion.residual.then(|| z.view());
            let run = |b: &mut dyn BatchNormBackend| {
                b.set_state(&st).unwrap();
                let y = b
                    .forward_fused(x.view(), zv.clone(), fusion.activation, Mode::Train)
                    .unwrap();
                let g = b
                    .backward_fused(x.view(), y.view(), dy.view(), fusion, Mode::Train)
                    .unwrap();
                let st = b.state().unwrap();
                let dz = g.dz.map(|d| flat(&d)).unwrap_or_default();
                [
                    ("y", flat(&y)),
                    ("dx", flat(&g.dx)),
                    ("dz", dz),
                    ("dweight", g.dweight.unwrap()),
                    ("dbias", g.dbias.unwrap()),
                    ("running_var", st.running_var.unwrap()),
                ]
            };
            let want = run(&mut CpuReference::new(cfg.clone()).unwrap());
            let got = with_threads(
                threads,
                || run(&mut CpuBatchNorm::new(cfg.clone()).unwrap()),
            );
            for ((k, g), (_, w)) in got.iter().zip(&want) {
                let case = format!("{fusion:?} on {threads} threads: {k}");
                all_close(&case, g, w, TOL, TOL).unwrap();
            }
        }
    }
}

#[test]
fn slice_api_matches_the_ndarray_api() {
    let mut r = rng(15);
    let dims = [4, 5, 6, 3];
    let cfg = BatchNormConfig::new(5);
    let st = random_state(&mut r, &cfg, 2);
    let x = normal(&mut r, &dims, 1.0, 2.0);
    let dy = normal(&mut r, &dims, 0.0, 1.0);
    let (xs, dys) = (flat(&x), flat(&dy));

    let mut a = CpuBatchNorm::new(cfg.clone()).unwrap();
    a.set_state(&st).unwrap();
    let mut b = a.clone();
    let n = xs.len();
    let mut y = vec![f32::NAN; n];
    a.forward_train_slice(&xs, &dims, &mut y).unwrap();
    assert_eq!(
        y,
        flat(&BatchNormBackend::forward_train(&mut b, x.view()).unwrap())
    );
    let (mut dx, mut dw, mut db) = (vec![f32::NAN; n], vec![f32::NAN; 5], vec![f32::NAN; 5]);
    a.backward_slice(&xs, &dys, &dims, Mode::Train, &mut dx, &mut dw, &mut db)
        .unwrap();
    let g = BatchNormBackend::backward(&mut b, x.view(), dy.view(), Mode::Train).unwrap();
    assert_eq!(dx, flat(&g.dx));
    assert_eq!(Some(dw), g.dweight);
    assert_eq!(Some(db), g.dbias);
    let mut ye = vec![f32::NAN; n];
    a.forward_eval_slice(&xs, &dims, &mut ye).unwrap();
    assert_eq!(
        ye,
        flat(&BatchNormBackend::forward_eval(&mut b, x.view()).unwrap())
    );
    assert_eq!(a.state(), &BatchNormBackend::state(&b).unwrap());
}

#[test]
fn failed_calls_change_nothing_and_name_the_problem() {
    let cfg = BatchNormConfig::new(3);
    let mut r = rng(16);
    let st = random_state(&mut r, &cfg, 4);
    let mut bn = CpuBatchNorm::new(cfg).unwrap();
    bn.set_state(&st).unwrap();
    let x = vec![1.5f32; 24];
    let mut y = vec![0.0f32; 24];

    // Wrong channel count, one value per channel, slice lengths.
    let e = bn.forward_train_slice(&x, &[6, 4], &mut y).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ChannelMismatch {
                expected: 3,
                got: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = bn
        .forward_train_slice(&x[..3], &[1, 3], &mut y[..3])
        .unwrap_err();
    assert!(matches!(e, Error::SingleValuePerChannel { .. }), "{e}");
    let e = bn
        .forward_eval_slice(&x[..21], &[8, 3], &mut y)
        .unwrap_err();
    assert!(e.to_string().contains("x (a slice of 21 elements)"), "{e}");
    let e = bn
        .forward_train_slice(&x, &[2, 3, 2, 2], &mut y[..20])
        .unwrap_err();
    assert!(e.to_string().contains("y (a slice of 20 elements)"), "{e}");
    assert_eq!(bn.state(), &st);
    assert!(bn.saved_stats().is_none());

    // Backward before any forward, and with outputs of the wrong size.
    let (mut dx, mut dw, mut db) = (vec![7.0f32; 24], vec![7.0f32; 3], vec![7.0f32; 3]);
    let e = bn
        .backward_slice(&x, &x, &[8, 3], Mode::Train, &mut dx, &mut dw, &mut db)
        .unwrap_err();
    assert!(matches!(e, Error::NoSavedStatistics { .. }), "{e}");
    let e = bn
        .backward_slice(&x, &x, &[8, 3], Mode::Eval, &mut dx, &mut dw[..2], &mut db)
        .unwrap_err();
    assert!(e.to_string().contains("dweight"), "{e}");
    assert!(
        dx.iter().chain(&dw).chain(&db).all(|&v| v == 7.0),
        "nothing written on error"
    );

    // A forward on one shape, backward on another.
    bn.forward_train_slice(&x, &[8, 3], &mut y).unwrap();
    let saved = bn.saved_stats();
    let after = bn.state().clone();
    let e = bn
        .backward_slice(&x, &x, &[4, 3, 2], Mode::Train, &mut dx, &mut dw, &mut db)
        .unwrap_err();
    assert!(e.to_string().contains("saved for shape [8, 3]"), "{e}");
    assert_eq!(bn.state(), &after);
    assert_eq!(bn.saved_stats(), saved);

    // ndarray: dy of another shape.
    let xa = ArrayD::from_shape_vec(vec![8, 3], x.clone()).unwrap();
    let dya = ArrayD::from_shape_vec(vec![4, 6], x.clone()).unwrap();
    let e = BatchNormBackend::backward(&mut bn, xa.view(), dya.view(), Mode::Train).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { ref what, .. } if what == "dy"),
        "{e}"
    );
    // A bad state is refused whole.
    let mut bad = st.clone();
    bad.weight = Some(vec![1.0; 2]);
    assert!(bn.set_state(&bad).is_err());
    assert_eq!(bn.state(), &after);
}

#[test]
fn nan_stays_in_its_channel() {
    let cfg = BatchNormConfig::new(2);
    let mut bn = CpuBatchNorm::new(cfg).unwrap();
    let mut x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.7).sin()).collect();
    x[4] = f32::NAN; // (N=20, C=2): element 4 is channel 0
    let mut y = vec![0.0f32; 40];
    bn.forward_train_slice(&x, &[20, 2], &mut y).unwrap();
    assert!(y.iter().step_by(2).all(|v| v.is_nan()));
    assert!(y.iter().skip(1).step_by(2).all(|v| v.is_finite()));
    let rv = bn.state().running_var.clone().unwrap();
    assert!(rv[0].is_nan() && rv[1].is_finite());
}

fn arb_case() -> impl Strategy<Value = (Vec<usize>, Layout, bool, bool, Option<f64>, f32, u64)> {
    (2usize..=5, any::<bool>())
        .prop_flat_map(|(rank, last)| {
            let layout = if last && rank >= 3 {
                Layout::ChannelsLast
            } else {
                Layout::ChannelsFirst
            };
            (
                proptest::collection::vec(1usize..=6, rank),
                Just(layout),
                any::<bool>(),
                any::<bool>(),
                prop_oneof![Just(None), (0.0f64..=1.0).prop_map(Some)],
                prop_oneof![Just(0.0f32), Just(300.0f32), -50.0f32..50.0],
                any::<u64>(),
            )
        })
        .prop_filter("training needs M > 1", |(dims, layout, ..)| {
            let c = if *layout == Layout::ChannelsFirst {
                dims[1]
            } else {
                dims[dims.len() - 1]
            };
            dims.iter().product::<usize>() / c > 1
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matches_the_reference_on_random_shapes(
        (dims, layout, affine, track, momentum, mean, seed) in arb_case()
    ) {
        let c = if layout == Layout::ChannelsFirst { dims[1] } else { dims[dims.len() - 1] };
        let cfg = BatchNormConfig::new(c)
            .with_layout(layout)
            .with_affine(affine)
            .with_track_running_stats(track)
            .with_momentum(momentum);
        let mut r = rng(seed);
        let st = random_state(&mut r, &cfg, 1);
        let x = normal(&mut r, &dims, mean, 1.5);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        let res = compare(&format!("{dims:?} {layout}"), &cfg, &st, &x, &dy);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

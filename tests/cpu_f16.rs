//! f16 storage on the fast CPU backend (`CpuBatchNorm`): against the f64
//! reference emulating f16 storage (inputs rounded to f16) at the f16
//! tolerance of shared/FIXTURES.md for the big tensors and the f32 one for
//! the per-channel tensors; the slice methods over `&[half::f16]` against the
//! `f32` ones on the same (f16-rounded) values; non-finite values.

mod common;
use common::*;
use half::f16;
use ndarray::ArrayD;
use wgpu_batchnorm::*;

/// f16 tolerance of shared/FIXTURES.md, for `y`, `dx` and their evaluation forms.
const TOL_F16: f32 = 5e-3;

fn is_big(name: &str) -> bool {
    name.starts_with("y") || name.starts_with("dx")
}

/// Runs `x`, `dy` through the reference and the fast CPU backend, both storing
/// f16, and compares every output; the big outputs must be f16 values.
fn compare_with_reference(case: &str, cfg: &BatchNormConfig, x: &ArrayD<f32>, dy: &ArrayD<f32>) {
    let state = random_state(&mut rng(7), cfg, 2);
    let mut reference = CpuReference::new(cfg.clone()).unwrap();
    reference.set_state(&state).unwrap();
    reference.set_storage_dtype(DType::F16).unwrap();
    let mut fast = CpuBatchNorm::new(cfg.clone()).unwrap();
    BatchNormBackend::set_state(&mut fast, &state).unwrap();
    BatchNormBackend::set_storage_dtype(&mut fast, DType::F16).unwrap();
    assert_eq!(BatchNormBackend::storage_dtype(&fast), DType::F16);
    let want = run_all(&mut reference, x, dy);
    let got = run_all(&mut fast, x, dy);
    assert_eq!(got.nbt, want.nbt, "{case}");
    assert_eq!(got.tensors.len(), want.tensors.len(), "{case}");
    let mut failures = Vec::new();
    for ((k, g), (k2, w)) in got.tensors.iter().zip(&want.tensors) {
        assert_eq!(k, k2);
        let tol = if is_big(k) { TOL_F16 } else { TOL };
        if let Err(e) = all_close(k, g, w, tol, tol) {
            failures.push(format!("{case}: {e}"));
        }
        if is_big(k) {
            let not_f16 = g
                .iter()
                .filter(|&&v| !v.is_nan() && DType::F16.round(v) != v);
            assert_eq!(not_f16.count(), 0, "{case} {k}: outputs are not f16 values");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every walk of the fast backend: row walk (`(N, C)`, channels-last, short
/// spatial sizes), block walk (7x7 runs), channel walk (long runs, one
/// channel cut over tasks); a large mean; every configuration flag.
#[test]
fn f16_matches_the_reference_on_f16_rounded_inputs() {
    let first = BatchNormConfig::new;
    let last = |c| BatchNormConfig::new(c).with_layout(Layout::ChannelsLast);
    let cases: Vec<(&str, Vec<usize>, BatchNormConfig, f32)> = vec![
        ("rows_nc", vec![300, 24], first(24), 0.5),
        ("rows_short_spatial", vec![9, 6, 5], first(6), -1.0),
        ("blocks_7x7", vec![6, 40, 7, 7], first(40), 0.0),
        ("channels_long", vec![3, 4, 40, 60], first(4), 2.0),
        // Two channels a thread and more up to 8 threads: the backward runs
        // channel by channel in cache.
        ("channels_resident", vec![2, 16, 32, 40], first(16), 1.0),
        ("one_big_channel", vec![2, 1, 40_000], first(1), 0.25),
        ("nhwc", vec![4, 9, 11, 16], last(16), 0.0),
        ("nlc", vec![5, 33, 7], last(7), 1.0),
        ("ndhwc", vec![2, 3, 4, 5, 6], last(6), 0.0),
        ("large_mean", vec![8, 5, 12, 12], first(5), 300.0),
        ("large_mean_nhwc", vec![8, 12, 12, 5], last(5), 300.0),
        (
            "affine_off",
            vec![6, 7, 9],
            first(7).with_affine(false),
            0.0,
        ),
        (
            "no_tracking",
            vec![6, 9, 10],
            last(10).with_track_running_stats(false),
            0.0,
        ),
        (
            "momentum_none",
            vec![16, 3, 5],
            first(3).with_momentum(None),
            0.0,
        ),
    ];
    for (case, dims, cfg, mean) in cases {
        let mut r = rng(dims.iter().product::<usize>() as u64);
        let x = normal(&mut r, &dims, mean, 1.5);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        compare_with_reference(case, &cfg, &x, &dy);
    }
}

/// NaN, `±inf` and values past the f16 range (which become `±inf` when
/// stored), in both layouts: PyTorch's non-finite statistics, confined to
/// their channel.
#[test]
fn f16_non_finite_values_match_the_reference() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let dims = match layout {
            Layout::ChannelsFirst => vec![4, 5, 6, 7],
            Layout::ChannelsLast => vec![4, 6, 7, 5],
        };
        let cfg = BatchNormConfig::new(5).with_layout(layout);
        let walk = ChannelWalk::new(&dims, layout).unwrap();
        let mut r = rng(11);
        let mut x = normal(&mut r, &dims, 0.0, 1.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        let xs = x.as_slice_mut().unwrap();
        // Channel 0: a NaN. Channel 1: +inf. Channel 2: +inf and -inf.
        // Channel 3: 70000, past the largest f16 (65504): +inf once stored.
        xs[walk.index(0, 17)] = f32::NAN;
        xs[walk.index(1, 3)] = f32::INFINITY;
        xs[walk.index(2, 5)] = f32::INFINITY;
        xs[walk.index(2, 50)] = f32::NEG_INFINITY;
        xs[walk.index(3, 9)] = 70_000.0;
        let case = format!("non_finite {layout}");
        compare_with_reference(&case, &cfg, &x, &dy);

        // Channel 4 stays finite and normalized; channel 3 saw an infinity.
        let mut fast = CpuBatchNorm::new(cfg).unwrap();
        fast.set_storage_dtype(DType::F16).unwrap();
        let y = BatchNormBackend::forward_train(&mut fast, x.view()).unwrap();
        let ys = y.as_slice().unwrap();
        let per = walk.per_channel();
        assert!((0..per).all(|i| ys[walk.index(4, i)].is_finite()), "{case}");
        let s = fast.saved_stats().unwrap();
        assert!(s.mean[0].is_nan(), "{case}: {:?}", s.mean);
        assert_eq!(s.mean[1], f32::INFINITY, "{case}");
        assert!(s.mean[2].is_nan(), "{case}: {:?}", s.mean);
        assert_eq!(s.mean[3], f32::INFINITY, "{case}");
        assert!(s.mean[4].is_finite(), "{case}");
    }
}

/// The f16 slice methods compute exactly what the f32 ones compute on the
/// same values: the same statistics, state and parameter gradients to the
/// bit, and `y`, `dx` equal to the f32 results rounded to f16.
#[test]
fn f16_slices_are_the_f32_computation_rounded() {
    let cases = [
        (vec![64, 12], Layout::ChannelsFirst, 0.0),
        // Rows of 700 positions: the row loops take them in blocks.
        (vec![40, 700], Layout::ChannelsFirst, 0.5),
        (vec![3, 32, 7, 7], Layout::ChannelsFirst, 1.0),
        (vec![2, 3, 64, 70], Layout::ChannelsFirst, 300.0),
        (vec![3, 10, 9, 24], Layout::ChannelsLast, -2.0),
    ];
    for (dims, layout, mean) in cases {
        let c = ChannelWalk::new(&dims, layout).unwrap().channels;
        let cfg = BatchNormConfig::new(c).with_layout(layout);
        let case = format!("{dims:?} {layout}");
        let mut r = rng(c as u64);
        let x16: Vec<f16> = normal(&mut r, &dims, mean, 1.5)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let dy16: Vec<f16> = normal(&mut r, &dims, 0.0, 1.0)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let x32: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
        let dy32: Vec<f32> = dy16.iter().map(|v| v.to_f32()).collect();
        let n = x16.len();
        let state = random_state(&mut rng(3), &cfg, 1);
        let (mut a, mut b) = (
            CpuBatchNorm::new(cfg.clone()).unwrap(),
            CpuBatchNorm::new(cfg.clone()).unwrap(),
        );
        a.set_state(&state).unwrap();
        b.set_state(&state).unwrap();
        // Poisoned outputs: every element must be written.
        let (mut y16, mut y32) = (vec![f16::NAN; n], vec![f32::NAN; n]);
        let rounded =
            |v: &[f32]| -> Vec<u16> { v.iter().map(|&e| f16::from_f32(e).to_bits()).collect() };
        let bits = |v: &[f16]| -> Vec<u16> { v.iter().map(|e| e.to_bits()).collect() };

        a.forward_eval_slice(&x16, &dims, &mut y16).unwrap();
        b.forward_eval_slice(&x32, &dims, &mut y32).unwrap();
        assert_eq!(bits(&y16), rounded(&y32), "{case}: y_eval");

        a.forward_train_slice(&x16, &dims, &mut y16).unwrap();
        b.forward_train_slice(&x32, &dims, &mut y32).unwrap();
        assert_eq!(bits(&y16), rounded(&y32), "{case}: y");
        assert_eq!(a.saved_stats(), b.saved_stats(), "{case}");
        assert_eq!(a.state(), b.state(), "{case}");

        for mode in [Mode::Train, Mode::Eval] {
            let (mut dx16, mut dx32) = (vec![f16::NAN; n], vec![f32::NAN; n]);
            let (mut dw16, mut db16) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            let (mut dw32, mut db32) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            a.backward_slice(&x16, &dy16, &dims, mode, &mut dx16, &mut dw16, &mut db16)
                .unwrap();
            b.backward_slice(&x32, &dy32, &dims, mode, &mut dx32, &mut dw32, &mut db32)
                .unwrap();
            assert_eq!(bits(&dx16), rounded(&dx32), "{case}: dx {mode:?}");
            assert_eq!((dw16, db16), (dw32, db32), "{case}: {mode:?}");
        }
    }
}

/// The ndarray interface with f16 storage is the f16 slice methods on the
/// inputs rounded to f16.
#[test]
fn f16_storage_rounds_the_ndarray_inputs() {
    let dims = [5, 6, 8];
    let cfg = BatchNormConfig::new(6);
    let mut r = rng(5);
    let x = normal(&mut r, &dims, 0.5, 2.0);
    let mut a = CpuBatchNorm::new(cfg.clone()).unwrap();
    a.set_storage_dtype(DType::F16).unwrap();
    let y = BatchNormBackend::forward_train(&mut a, x.view()).unwrap();
    let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let mut b = CpuBatchNorm::new(cfg).unwrap();
    let mut y16 = vec![f16::ZERO; x16.len()];
    b.forward_train_slice(&x16, &dims, &mut y16).unwrap();
    let want: Vec<f32> = y16.iter().map(|v| v.to_f32()).collect();
    assert_eq!(flat(&y), want);
    assert_eq!(a.state(), b.state());
    // Back to f32 storage: the inputs are no longer rounded.
    a.set_storage_dtype(DType::F32).unwrap();
    assert_eq!(a.storage_dtype(), DType::F32);
    let y32 = BatchNormBackend::forward_eval(&mut a, x.view()).unwrap();
    assert!(flat(&y32).iter().any(|&v| DType::F16.round(v) != v));
}

#[test]
fn f16_slice_errors_leave_the_layer_unchanged() {
    let mut bn = CpuBatchNorm::new(BatchNormConfig::new(3)).unwrap();
    let before = bn.state().clone();
    let x = vec![f16::ONE; 12];
    let mut y = vec![f16::NAN; 11];
    let e = bn.forward_train_slice(&x, &[4, 3], &mut y).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("y (a slice of 11 elements)"), "{e}");
    assert!(y.iter().all(|v| v.is_nan()), "y written on error");
    assert_eq!(bn.state(), &before);
    assert!(bn.saved_stats().is_none());
    let (mut dx, mut dw, mut db) = (vec![f16::NAN; 12], vec![0.0; 3], vec![0.0; 3]);
    let e = bn
        .backward_slice(&x, &x, &[4, 3], Mode::Train, &mut dx, &mut dw, &mut db)
        .unwrap_err();
    assert!(matches!(e, Error::NoSavedStatistics { .. }), "{e}");
    assert!(dx.iter().all(|v| v.is_nan()), "dx written on error");
}

/// The copy roofline copies f16 elements bit for bit.
#[test]
fn f16_parallel_copy_is_exact() {
    let src: Vec<f16> = (0..100_000u32).map(|i| f16::from_bits(i as u16)).collect();
    let mut dst = vec![f16::ZERO; src.len()];
    cpu::parallel_copy(&src, &mut dst).unwrap();
    assert!(
        src.iter()
            .zip(&dst)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let e = cpu::parallel_copy(&src, &mut dst[1..]).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

/// A synchronized step of one rank stores f16 as the local step does: the
/// same statistics, state and gradients, `y` and `dx` to the bit.
#[test]
fn f16_synchronized_step_of_one_rank_is_the_local_one() {
    use wgpu_batchnorm::sync::{self, InProcessCollective};
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let dims = [6, 5, 9, 4];
        let cfg = BatchNormConfig::new(dims[if layout == Layout::ChannelsLast { 3 } else { 1 }])
            .with_layout(layout);
        let mut r = rng(21);
        let x = normal(&mut r, &dims, 1.0, 2.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        let mut local = CpuBatchNorm::new(cfg.clone()).unwrap();
        let mut synced = CpuBatchNorm::new(cfg).unwrap();
        local.set_storage_dtype(DType::F16).unwrap();
        synced.set_storage_dtype(DType::F16).unwrap();
        let comm = InProcessCollective::group(1).pop().unwrap();
        let y = BatchNormBackend::forward_train(&mut local, x.view()).unwrap();
        let ys = sync::forward_train(&mut synced, &comm, x.view()).unwrap();
        assert_eq!(flat(&ys), flat(&y), "{layout}");
        assert!(
            flat(&y).iter().all(|&v| DType::F16.round(v) == v),
            "{layout}"
        );
        assert_eq!(local.saved_stats(), synced.saved_stats(), "{layout}");
        assert_eq!(local.state(), synced.state(), "{layout}");
        let g = BatchNormBackend::backward(&mut local, x.view(), dy.view(), Mode::Train).unwrap();
        let gs = sync::backward(&mut synced, &comm, x.view(), dy.view()).unwrap();
        assert_eq!(flat(&gs.dx), flat(&g.dx), "{layout}");
        assert_eq!((gs.dweight, gs.dbias), (g.dweight, g.dbias), "{layout}");
    }
}

//! GPU vs CPU reference, every operation, on every adapter wgpu finds.

mod common;
use common::*;
use ndarray::{ArrayD, Axis};
use wgpu_batchnorm::{BatchNormConfig, Layout};

fn case(
    name: &str,
    dims: &[usize],
    config: BatchNormConfig,
    mean: f32,
    std: f32,
    slice_len: Option<u32>,
    seed: u64,
) {
    let mut r = rng(seed);
    let state = random_state(&mut r, &config, 3);
    let x = normal(&mut r, dims, mean, std);
    let dy = normal(&mut r, dims, 0.0, 1.0);
    let n = check_parity(name, &config, &state, &x, &dy, slice_len);
    assert_eq!(n, gpu_contexts().len());
}

fn nchw(c: usize) -> BatchNormConfig {
    BatchNormConfig::new(c)
}

#[test]
fn every_rank() {
    case("rank2", &[16, 5], nchw(5), 0.5, 2.0, None, 1);
    case("rank3", &[4, 3, 10], nchw(3), -1.0, 1.0, None, 2);
    case("rank4", &[4, 6, 7, 9], nchw(6), 0.0, 3.0, None, 3);
    case("rank5", &[2, 3, 4, 5, 6], nchw(3), 2.0, 0.5, None, 4);
}

#[test]
fn channels_last_every_rank() {
    let last = |c| BatchNormConfig::new(c).with_layout(Layout::ChannelsLast);
    case("nlc", &[4, 10, 3], last(3), 0.5, 2.0, None, 5);
    case("nhwc", &[4, 7, 9, 6], last(6), 1.0, 1.0, Some(50), 6);
    case("ndhwc", &[2, 4, 5, 6, 3], last(3), -2.0, 1.5, None, 7);
}

#[test]
fn odd_and_tiny_sizes() {
    case("c1", &[8, 1, 5, 5], nchw(1), 1.0, 1.0, None, 10);
    case("m2_1d", &[2, 3], nchw(3), 0.0, 1.0, None, 11);
    case("m2_3d", &[1, 3, 2], nchw(3), 0.0, 1.0, None, 12);
    case("n1_spatial", &[1, 4, 3, 5], nchw(4), 0.0, 1.0, None, 13);
    // element counts that are not multiples of 4 (scalar kernels) nor of 256
    case("odd_105", &[3, 5, 7], nchw(5), 0.3, 1.0, None, 14);
    case("odd_195", &[5, 3, 13], nchw(3), 0.3, 1.0, Some(7), 15);
    // multiple of 4 overall but spatial size not: the vec4 kernels straddle channels
    case("straddle", &[4, 3, 3], nchw(3), 0.3, 1.0, None, 16);
    case("wide", &[64, 130], nchw(130), 0.0, 1.0, None, 17);
}

#[test]
fn elementwise_grids() {
    let last = |c| BatchNormConfig::new(c).with_layout(Layout::ChannelsLast);
    // rows (C * inner elements) that are whole vec4s while runs are not: the
    // four lanes of an item fall in different channels
    case("lanes_straddle", &[4, 4, 3, 3], nchw(4), 0.3, 1.0, None, 30);
    case("lanes_nhwc", &[3, 5, 5, 8], last(8), 0.3, 1.0, None, 31);
    // enough items that threads walk several bands (the grid's `steps`; see
    // `ElementGrid` in src/gpu/batchnorm/grid.rs, whose tests pin these shapes)
    case("steps_vec4", &[8, 16, 48, 48], nchw(16), 0.3, 1.0, None, 32);
    case(
        "steps_nhwc",
        &[16, 12, 12, 128],
        last(128),
        0.3,
        1.0,
        None,
        33,
    );
    case("steps_scalar", &[9001, 33], nchw(33), 0.3, 1.0, None, 34);
}

#[test]
fn channels_spread_over_several_slices() {
    // default slicing: M = 8320 > 4096 gives several workgroups per channel
    case(
        "default_slices",
        &[2, 3, 64, 65],
        nchw(3),
        0.5,
        1.0,
        None,
        20,
    );
    // forced slices with a short last slice
    case(
        "forced_slices",
        &[4, 3, 17, 19],
        nchw(3),
        0.5,
        1.0,
        Some(100),
        21,
    );
    // one element per thread and slices shorter than a workgroup
    case("slice_1", &[3, 2, 5], nchw(2), 0.5, 1.0, Some(1), 22);
}

#[test]
fn dispatches_fold_onto_a_2d_grid() {
    // With at most 7 workgroups per grid dimension every pass folds: 5 channels
    // x 9 slices = 45 reduction workgroups, 2-D elementwise grids, and per-channel
    // passes of 130 channels; grids overshoot, so the shaders' bounds checks matter.
    let mut r = rng(23);
    for (dims, c, slice) in [
        (&[3usize, 5, 11, 13][..], 5, Some(50)),
        (&[33, 130][..], 130, None),
    ] {
        let config = nchw(c);
        let state = random_state(&mut r, &config, 1);
        let x = normal(&mut r, dims, 0.2, 1.0);
        let dy = normal(&mut r, dims, 0.0, 1.0);
        check_parity_tuned("folded", &config, &state, &x, &dy, slice, Some(7));
    }
}

#[test]
fn large_mean_is_stable() {
    // 300 + N(0,1): E[x^2] - E[x]^2 in f32 would lose every digit of the variance
    case(
        "large_mean",
        &[4, 3, 16, 16],
        nchw(3),
        300.0,
        1.0,
        Some(64),
        30,
    );
    case(
        "large_mean_default",
        &[8, 2, 32, 32],
        nchw(2),
        300.0,
        1.0,
        None,
        31,
    );
    let last = BatchNormConfig::new(3).with_layout(Layout::ChannelsLast);
    case(
        "large_mean_nhwc",
        &[4, 8, 8, 3],
        last,
        300.0,
        1.0,
        Some(30),
        32,
    );
}

#[test]
fn constant_channel() {
    let mut r = rng(40);
    let config = nchw(3);
    let state = random_state(&mut r, &config, 0);
    let mut x: ArrayD<f32> = normal(&mut r, &[4, 3, 5, 6], 0.0, 1.0);
    x.index_axis_mut(Axis(1), 1).fill(2.5);
    let dy = normal(&mut r, &[4, 3, 5, 6], 0.0, 1.0);
    check_parity("constant_channel", &config, &state, &x, &dy, Some(16));
}

/// `eps = 1e-30` on a constant channel: `invstd = 1e15`, whose cube (1e45)
/// overflows f32. The backward orders its products as PyTorch does, so `dx`
/// stays finite and matches the reference.
#[test]
fn tiny_eps_on_a_constant_channel() {
    let mut r = rng(41);
    let config = nchw(3).with_eps(1e-30);
    let state = random_state(&mut r, &config, 0);
    let mut x: ArrayD<f32> = normal(&mut r, &[4, 3, 5, 6], 0.0, 1.0);
    x.index_axis_mut(Axis(1), 1).fill(-7.25);
    let dy = normal(&mut r, &[4, 3, 5, 6], 0.0, 1.0);
    let n = check_parity("tiny_eps", &config, &state, &x, &dy, Some(16));
    assert_eq!(n, gpu_contexts().len());
}

/// `|mean| / std` of 1e5 (x = 5000 + 0.05 N(0,1)): the statistics pass keeps
/// the mean as a value of the channel plus the mean of `x - K`, so `x - mean`
/// carries no rounding of the mean to f32.
#[test]
fn tiny_spread_under_a_large_mean() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let dims: &[usize] = if layout == Layout::ChannelsFirst {
            &[6, 4, 9, 7]
        } else {
            &[6, 9, 7, 4]
        };
        let config = nchw(4).with_layout(layout);
        case("tiny_spread", dims, config, 5000.0, 0.05, Some(40), 42);
    }
}

/// Non-finite values stay in their channel and give PyTorch's statistics:
/// a channel with `+inf` among finite values has `running_mean = +inf` and a
/// NaN variance, one with `-inf` the same with `-inf`, one with both or a NaN
/// has NaN; the finite channel beside them is untouched. On the fast CPU
/// backend and every adapter.
#[test]
fn infinities_and_nan_stay_in_their_channel() {
    use wgpu_batchnorm::{BatchNormBackend, CpuBatchNorm, CpuReference, GpuBatchNorm};
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    // channels: +inf, -inf, +inf and -inf, NaN, finite
    let rows = [
        [1.0, -1.0, inf, 0.5, 1.0],
        [inf, 2.0, -inf, nan, 2.0],
        [3.0, -inf, 3.0, 1.5, 4.0],
        [4.0, 4.0, 4.0, 2.5, 8.0],
    ];
    let x = ArrayD::from_shape_vec(vec![4, 5], rows.concat()).unwrap();
    let same = |got: f32, want: f32| {
        (got.is_nan() && want.is_nan())
            || got == want
            || (got - want).abs() <= 1e-4 * (1.0 + want.abs())
    };
    let config = nchw(5);
    let mut reference = CpuReference::new(config.clone()).unwrap();
    let y_ref = reference.forward_train(x.view()).unwrap();
    let state_ref = reference.state().unwrap();
    let saved_ref = reference.saved_stats().unwrap().unwrap();
    assert_eq!(
        state_ref.running_mean.as_ref().unwrap()[..2],
        [0.1 * inf, -0.1 * inf]
    );
    let mut layers: Vec<Box<dyn BatchNormBackend>> =
        vec![Box::new(CpuBatchNorm::new(config.clone()).unwrap())];
    for ctx in gpu_contexts() {
        layers.push(Box::new(GpuBatchNorm::new(ctx, config.clone()).unwrap()));
    }
    for bn in &mut layers {
        let y = bn.forward_train(x.view()).unwrap();
        let state = bn.state().unwrap();
        let saved = bn.saved_stats().unwrap().unwrap();
        let pairs = [
            (
                "y",
                y.iter().copied().collect::<Vec<_>>(),
                y_ref.iter().copied().collect(),
            ),
            (
                "running_mean",
                state.running_mean.clone().unwrap(),
                state_ref.running_mean.clone().unwrap(),
            ),
            (
                "running_var",
                state.running_var.clone().unwrap(),
                state_ref.running_var.clone().unwrap(),
            ),
            ("save_mean", saved.mean.clone(), saved_ref.mean.clone()),
            (
                "save_invstd",
                saved.invstd.clone(),
                saved_ref.invstd.clone(),
            ),
        ];
        for (what, got, want) in pairs {
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    same(g, w),
                    "{}: {what}[{i}] is {g}, the reference gives {w}\n  got  {got:?}\n  want {want:?}",
                    bn.backend_name()
                );
            }
        }
    }
}

#[test]
fn every_config_flag() {
    let base = || BatchNormConfig::new(4);
    let flags = [
        ("affine_off", base().with_affine(false)),
        ("tracking_off", base().with_track_running_stats(false)),
        (
            "neither",
            base().with_affine(false).with_track_running_stats(false),
        ),
        ("momentum_none", base().with_momentum(None)),
        ("momentum_0", base().with_momentum(Some(0.0))),
        ("momentum_1", base().with_momentum(Some(1.0))),
        ("keras", base().with_eps(1e-3).with_momentum(Some(0.01))),
        ("eps_large", base().with_eps(0.5)),
    ];
    for (i, (name, config)) in flags.into_iter().enumerate() {
        case(
            name,
            &[3, 4, 5, 6],
            config.clone(),
            0.5,
            1.5,
            None,
            50 + i as u64,
        );
        let last = config.with_layout(Layout::ChannelsLast);
        case(name, &[3, 5, 6, 4], last, 0.5, 1.5, Some(9), 60 + i as u64);
    }
}

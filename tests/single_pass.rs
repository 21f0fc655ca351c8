//! The single-pass training forward, evaluation forward and backward
//! (`GpuBatchNorm::set_single_pass`): where they run, seen in
//! `last_dispatches`, and that they give the reference's results and those
//! of the passes, for every kind of item (vec4 runs, vec4 lanes of four
//! channels, single elements: the forward only), the fused forward and
//! backward and f16 storage. The parity, property and fixture tests run
//! them too: by default on every adapter for tensors of at most 2^17
//! elements, on the CPU adapters up to 2^19, and on lavapipe (a CPU adapter
//! on Vulkan) for larger ones.

mod common;
use common::*;
use ndarray::ArrayD;
use wgpu_batchnorm::{
    Activation, BatchNormBackend, BatchNormConfig, DType, Fusion, GpuBatchNorm, GpuContext,
    GpuTensor, Layout, Mode,
};

/// `(name, shape, layout, the single pass's kernel)`.
fn cases() -> Vec<(&'static str, Vec<usize>, Layout, &'static str)> {
    use Layout::{ChannelsFirst as First, ChannelsLast as Last};
    vec![
        ("runs_of_vec4s", vec![4, 6, 8, 8], First, "forward_single"),
        ("lanes_nhwc", vec![3, 5, 5, 8], Last, "forward_single"),
        ("lanes_nc", vec![64, 12], First, "forward_single"),
        (
            "scalar_7x7",
            vec![4, 5, 7, 7],
            First,
            "forward_single_scalar",
        ),
        (
            "scalar_nhwc",
            vec![4, 5, 5, 6],
            Last,
            "forward_single_scalar",
        ),
        // 21 elements a channel: the last item holds one
        ("scalar_tail", vec![3, 5, 7], First, "forward_single_scalar"),
        // runs of four channels one after the other (7x7, 5 and 9 long)
        ("quads_7x7", vec![4, 8, 7, 7], First, "forward_single"),
        ("quads_5", vec![3, 4, 5], First, "forward_single"),
        ("quads_3x3", vec![5, 12, 3, 3], First, "forward_single"),
        // runs 2 and 3 past a multiple of 4: the channels meet elsewhere in an item
        ("quads_6", vec![3, 8, 6], First, "forward_single"),
        ("quads_7", vec![2, 4, 7], First, "forward_single"),
        // 256 threads a channel, 13 and 32 items each (the most a thread holds)
        ("many_items", vec![8, 3, 40, 40], First, "forward_single"),
        ("most_items", vec![2, 2, 16384], First, "forward_single"),
    ]
}

fn config_of(dims: &[usize], layout: Layout) -> BatchNormConfig {
    let c = match layout {
        Layout::ChannelsFirst => dims[1],
        Layout::ChannelsLast => dims[dims.len() - 1],
    };
    BatchNormConfig::new(c).with_layout(layout)
}

/// The kernels of the last call of `bn`, as `kernel_name` gives them.
fn kernels(bn: &GpuBatchNorm) -> Vec<&'static str> {
    bn.last_dispatches()
        .iter()
        .map(|d| kernel_name(d.kernel))
        .collect()
}

/// The dispatches of a single-pass forward of `kernel`, as the last call of
/// `bn` ran it: `kernel`, then `single_finalize`, unless its grid is one
/// workgroup, which counts the batch and finishes its channels itself.
fn single_forward(bn: &GpuBatchNorm, kernel: &'static str) -> Vec<&'static str> {
    if bn.last_dispatches()[0].grid == [1, 1] {
        vec![kernel]
    } else {
        vec![kernel, "single_finalize"]
    }
}

#[test]
fn the_single_pass_matches_the_reference_and_the_passes() {
    for (i, (name, dims, layout, _)) in cases().into_iter().enumerate() {
        let config = config_of(&dims, layout);
        let mut r = rng(300 + i as u64);
        let state = random_state(&mut r, &config, 3);
        let x = normal(&mut r, &dims, 2.0, 1.5);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        // the layers forced into one pass on every adapter, and in passes
        let checked = check_parity_with(name, &config, &state, &x, &dy, &|bn| {
            bn.set_single_pass(Some(true));
        });
        assert_eq!(checked, gpu_contexts().len());
    }
}

#[test]
fn it_runs_where_it_applies_and_not_elsewhere() {
    assert!(!gpu_contexts().is_empty() || !gpu_required());
    // forced single-pass forwards with and without single_finalize
    let mut alone = [0, 0];
    for (name, dims, layout, kernel) in cases() {
        let config = config_of(&dims, layout);
        let x = normal(&mut rng(7), &dims, 0.0, 1.0);
        for ctx in gpu_contexts() {
            let gx = GpuTensor::from_array(ctx, x.view(), layout).unwrap();
            let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            let on = format!("{name} on {}", ctx.label());
            // the default on every adapter for tensors this small
            bn.run_forward_train(&gx).unwrap();
            assert_eq!(kernels(&bn), single_forward(&bn, kernel), "{on}");
            let vec4 = kernel == "forward_single";
            bn.run_forward_eval(&gx).unwrap();
            let eval_kernels = kernels(&bn);
            if vec4 {
                assert_eq!(eval_kernels, ["forward_single"], "{on}");
            } else {
                assert_eq!(eval_kernels[0], "eval_coeffs", "{on}");
            }
            bn.set_single_pass(Some(true));
            bn.run_forward_train(&gx).unwrap();
            assert_eq!(kernels(&bn), single_forward(&bn, kernel), "{on}");
            alone[usize::from(kernels(&bn).len() == 1)] += 1;
            // an evaluation forward with batch statistics (counts nothing)
            let mut eval =
                GpuBatchNorm::new(ctx, config.clone().with_track_running_stats(false)).unwrap();
            eval.set_single_pass(Some(true));
            eval.run_forward_eval(&gx).unwrap();
            assert_eq!(kernels(&eval), single_forward(&eval, kernel), "{on}");
            // the backward: in one pass for vec4 items, by default on
            // lavapipe (items of four channels' runs included)
            let fwd = bn.run_forward_train(&gx).unwrap();
            bn.run_backward(&gx, &gx, &fwd.saved).unwrap();
            if kernel == "forward_single" {
                assert_eq!(kernels(&bn), ["backward_single"], "{on}");
            } else {
                assert_eq!(kernels(&bn).len(), 3, "{on}: {:?}", kernels(&bn));
            }
            let mut plain = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            let fwd = plain.run_forward_train(&gx).unwrap();
            plain.run_backward(&gx, &gx, &fwd.saved).unwrap();
            assert_eq!(kernels(&plain) == ["backward_single"], vec4, "{on}");
            let eval_fwd = eval.run_forward_eval(&gx).unwrap();
            eval.run_backward(&gx, &gx, &eval_fwd.saved).unwrap();
            assert_eq!(
                kernels(&eval).len() == 1,
                kernel == "forward_single",
                "{on}"
            );
            bn.set_single_pass(Some(false));
            bn.run_forward_eval(&gx).unwrap();
            assert_eq!(kernels(&bn)[0], "eval_coeffs", "{on}");
            let fwd = bn.run_forward_train(&gx).unwrap();
            let passes = kernels(&bn);
            assert!(passes[0].starts_with("stats_partial"), "{on}: {passes:?}");
            assert_eq!(passes.len(), 3, "{on}: {passes:?}");
            bn.run_backward(&gx, &gx, &fwd.saved).unwrap();
            let passes = kernels(&bn);
            assert!(
                passes[0].starts_with("backward_partial"),
                "{on}: {passes:?}"
            );
            assert_eq!(passes.len(), 3, "{on}: {passes:?}");
        }
    }
    if !gpu_contexts().is_empty() {
        assert!(alone[0] > 0 && alone[1] > 0, "{alone:?}");
    }
    // past 2^17 elements, up to 2^19: the default on CPU adapters (lavapipe,
    // llvmpipe's GL) only, and not for the evaluation forward or a backward
    // from the running statistics
    let dims = [4, 8, 64, 65];
    let x = normal(&mut rng(11), &dims, 0.0, 1.0);
    for ctx in gpu_contexts() {
        let on = ctx.label();
        let gx = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(8)).unwrap();
        let fwd = bn.run_forward_train(&gx).unwrap();
        let cpu = ctx.adapter_info().device_type == wgpu_batchnorm::wgpu::DeviceType::Cpu;
        assert_eq!(kernels(&bn)[0] == "forward_single", cpu, "{on}");
        bn.run_backward(&gx, &gx, &fwd.saved).unwrap();
        assert_eq!(kernels(&bn) == ["backward_single"], cpu, "{on}");
        let eval = bn.run_forward_eval(&gx).unwrap();
        assert_eq!(kernels(&bn)[0], "eval_coeffs", "{on}");
        // from the running statistics: the passes on every adapter
        bn.run_backward(&gx, &gx, &eval.saved).unwrap();
        assert_eq!(kernels(&bn)[0], "backward_partial_vec4", "{on}");
        bn.set_single_pass(Some(true));
        bn.run_forward_eval(&gx).unwrap();
        assert_eq!(kernels(&bn), ["forward_single"], "{on}");
        bn.run_backward(&gx, &gx, &eval.saved).unwrap();
        assert_eq!(kernels(&bn), ["backward_single"], "{on}");
    }
    // past 2^19 elements, in vec4 runs (64x65) and four channels' runs (of
    // 2025): in one pass on lavapipe only
    for (seed, dims) in [(11, [4, 32, 64, 65]), (12, [2, 132, 45, 45])] {
        let x = normal(&mut rng(seed), &dims, 0.0, 1.0);
        for ctx in gpu_contexts() {
            let gx = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
            let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(dims[1])).unwrap();
            let fwd = bn.run_forward_train(&gx).unwrap();
            let on = format!("{dims:?} on {}", ctx.label());
            let lavapipe = is_lavapipe(ctx);
            assert_eq!(kernels(&bn)[0] == "forward_single", lavapipe, "{on}");
            bn.run_backward(&gx, &gx, &fwd.saved).unwrap();
            assert_eq!(kernels(&bn) == ["backward_single"], lavapipe, "{on}");
        }
    }
    // an evaluation-mode backward from the running statistics: one pass for
    // a small tensor by default
    let x = normal(&mut rng(10), &[4, 6, 8, 8], 0.0, 1.0);
    for ctx in gpu_contexts() {
        let gx = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(6)).unwrap();
        let fwd = bn.run_forward_eval(&gx).unwrap();
        bn.run_backward(&gx, &gx, &fwd.saved).unwrap();
        assert_eq!(kernels(&bn), ["backward_single"], "{}", ctx.label());
    }
    // a tensor bound in chunks (here two of 32 rows) takes the passes
    let x = normal(&mut rng(9), &[64, 12], 0.0, 1.0);
    for ctx in gpu_contexts() {
        let gx = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(12)).unwrap();
        bn.set_single_pass(Some(true));
        bn.set_max_binding_bytes(Some(32 * 12 * 4)).unwrap();
        bn.run_forward_train(&gx).unwrap();
        let ran = kernels(&bn);
        assert_eq!(
            ran.iter()
                .filter(|k| k.starts_with("stats_partial"))
                .count(),
            2,
            "{ran:?}"
        );
    }
    // channels of more than 32768 elements take the passes
    let dims = [2, 3, 16400];
    let x = normal(&mut rng(8), &dims, 0.0, 1.0);
    for ctx in gpu_contexts() {
        let gx = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        bn.set_single_pass(Some(true));
        bn.run_forward_train(&gx).unwrap();
        assert!(
            kernels(&bn)[0].starts_with("stats_partial"),
            "{:?}",
            kernels(&bn)
        );
    }
}

/// `y`, saved statistics and running statistics of a fused training forward
/// of `x` + `z` with `act`, in one pass or in passes, then `y` and the saved
/// statistics of a fused evaluation forward.
fn fused_forward(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    (x, z): (&ArrayD<f32>, &ArrayD<f32>),
    act: Activation,
    single: bool,
) -> Vec<Vec<f32>> {
    let gx = GpuTensor::from_array(ctx, x.view(), config.layout).unwrap();
    let gz = GpuTensor::from_array(ctx, z.view(), config.layout).unwrap();
    let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
    bn.set_single_pass(Some(single));
    let fwd = bn.run_forward_train_fused(&gx, Some(&gz), act).unwrap();
    let ran = kernels(&bn);
    assert_eq!(
        ran.iter().any(|k| k.starts_with("forward_single")),
        single,
        "{ran:?}"
    );
    let s = bn.state().unwrap();
    let saved = fwd.saved.read().unwrap().unwrap();
    // and the fused evaluation forward from the running statistics moved
    let eval = bn.run_forward_eval_fused(&gx, Some(&gz), act).unwrap();
    let eval_saved = eval.saved.read().unwrap().unwrap();
    vec![
        fwd.y.to_vec().unwrap(),
        saved.mean,
        saved.invstd,
        s.running_mean.unwrap(),
        s.running_var.unwrap(),
        eval.y.to_vec().unwrap(),
        eval_saved.mean,
        eval_saved.invstd,
    ]
}

#[test]
fn fused_forwards_in_one_pass_match_those_in_passes() {
    for (i, (name, dims, layout, _)) in cases().into_iter().take(11).enumerate() {
        let config = config_of(&dims, layout);
        let mut r = rng(400 + i as u64);
        let x = normal(&mut r, &dims, -1.0, 2.0);
        let z = normal(&mut r, &dims, 0.5, 1.0);
        for ctx in gpu_contexts() {
            for act in [Activation::Identity, Activation::Relu] {
                let one = fused_forward(ctx, &config, (&x, &z), act, true);
                let passes = fused_forward(ctx, &config, (&x, &z), act, false);
                let names = [
                    "y",
                    "mean",
                    "invstd",
                    "running_mean",
                    "running_var",
                    "y_eval",
                    "mean_eval",
                    "invstd_eval",
                ];
                for (what, (a, b)) in names.iter().zip(one.iter().zip(&passes)) {
                    all_close(what, a, b, TOL, TOL)
                        .unwrap_or_else(|e| panic!("{name} {act:?} on {}: {e}", ctx.label()));
                }
            }
        }
    }
}

/// f16 storage, native and packed: the forward and the backward in one pass
/// give what they give in passes.
#[test]
fn f16_in_one_pass_matches_f16_in_passes() {
    for (i, (name, dims, layout, kernel)) in cases().into_iter().take(11).enumerate() {
        let config = config_of(&dims, layout);
        let mut r = rng(500 + i as u64);
        let x = normal(&mut r, &dims, 1.0, 2.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        for ctx in gpu_contexts() {
            let shader_f16 = ctx.features().contains(wgpu::Features::SHADER_F16);
            for packed in [false, true] {
                if packed && !shader_f16 {
                    continue; // the adapter's own f16 kernels are the packed ones
                }
                let on = format!("{name} on {} (packed {packed})", ctx.label());
                let run = |single: bool| {
                    let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
                    bn.set_storage_dtype(DType::F16).unwrap();
                    bn.set_packed_f16(packed).unwrap();
                    bn.set_single_pass(Some(single));
                    let y = flat(&bn.forward_train(x.view()).unwrap());
                    let rm = bn.state().unwrap().running_mean.unwrap();
                    let ran = (kernels(&bn), single_forward(&bn, kernel));
                    let g = bn.backward(x.view(), dy.view(), Mode::Train).unwrap();
                    let vec4 = kernel == "forward_single";
                    assert_eq!(kernels(&bn) == ["backward_single"], single && vec4, "{on}");
                    let grads = [flat(&g.dx), g.dweight.unwrap(), g.dbias.unwrap()];
                    (y, rm, ran, grads)
                };
                let (one, rm1, ran, g1) = run(true);
                let (passes, rm2, _, g2) = run(false);
                let packed_words = packed || !shader_f16;
                let (ran, want) = ran;
                if packed_words && kernel == "forward_single_scalar" {
                    // single elements cannot be written into shared words
                    assert!(ran[0].starts_with("stats_partial"), "{on}: {ran:?}");
                } else {
                    assert_eq!(ran, want, "{on}");
                }
                // y is rounded to f16: one unit in the last place of 2^-10
                all_close("y", &one, &passes, 2e-3, 2e-3).unwrap_or_else(|e| panic!("{on}: {e}"));
                all_close("running_mean", &rm1, &rm2, TOL, TOL)
                    .unwrap_or_else(|e| panic!("{on}: {e}"));
                // dx is rounded to f16 as y is; dweight and dbias are f32
                for (what, (a, b), tol) in [
                    ("dx", (&g1[0], &g2[0]), 2e-3),
                    ("dweight", (&g1[1], &g2[1]), 1e-3),
                    ("dbias", (&g1[2], &g2[2]), 1e-3),
                ] {
                    all_close(what, a, b, tol, tol).unwrap_or_else(|e| panic!("{on}: {e}"));
                }
            }
        }
    }
}

/// A channel with +inf, one with NaN, one with both infinities, one finite,
/// in every kind of item: the single pass gives the reference's values
/// (PyTorch's: a +inf mean and NaN variance for +inf, NaN for the others),
/// and the finite channels their own.
#[test]
fn non_finite_values_stay_in_their_channel() {
    use wgpu_batchnorm::CpuReference;
    let same = |got: f32, want: f32| {
        (got.is_nan() && want.is_nan())
            || got == want
            || (got - want).abs() <= 1e-4 * (1.0 + want.abs())
    };
    for (name, dims, layout, _) in cases().into_iter().take(11) {
        let config = config_of(&dims, layout);
        let c = config.num_features;
        let mut x = normal(&mut rng(600), &dims, 0.0, 1.0);
        let channel_axis = match layout {
            Layout::ChannelsFirst => 1,
            Layout::ChannelsLast => dims.len() - 1,
        };
        for (idx, v) in x.indexed_iter_mut() {
            let (ch, n) = (idx[channel_axis], idx[0]);
            match (ch, n) {
                (0, 0) => *v = f32::INFINITY,
                (1, 0) => *v = f32::NAN,
                (2, 0) if c > 3 => *v = f32::INFINITY,
                (2, 1) if c > 3 => *v = f32::NEG_INFINITY,
                (3, 1) if c > 4 => *v = f32::NEG_INFINITY,
                _ => {}
            }
        }
        let outputs = |b: &mut dyn BatchNormBackend| {
            let y = flat(&b.forward_train(x.view()).unwrap());
            let saved = b.saved_stats().unwrap().unwrap();
            let s = b.state().unwrap();
            vec![
                y,
                saved.mean,
                saved.invstd,
                s.running_mean.unwrap(),
                s.running_var.unwrap(),
            ]
        };
        let want = outputs(&mut CpuReference::new(config.clone()).unwrap());
        assert!(want[3][0].is_infinite() && want[3][1].is_nan(), "{name}");
        assert!(c <= 4 || want[3][3] == f32::NEG_INFINITY, "{name}");
        for ctx in gpu_contexts() {
            let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            bn.set_single_pass(Some(true));
            let got = outputs(&mut bn);
            assert!(kernels(&bn).iter().any(|k| k.starts_with("forward_single")));
            for (what, (g, w)) in ["y", "mean", "invstd", "running_mean", "running_var"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                    assert!(
                        same(g, w),
                        "{name} on {}: {what}[{i}] = {g}, want {w}",
                        ctx.label()
                    );
                }
            }
        }
    }
}

/// `dx`, `dz`, `dweight` and `dbias` of the backward of a fused training
/// forward of `x` + `z` with `fusion`, in one pass or in passes.
fn fused_backward(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    (x, z, dy): (&ArrayD<f32>, &ArrayD<f32>, &ArrayD<f32>),
    fusion: Fusion,
    single: bool,
) -> Vec<Vec<f32>> {
    let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
    bn.set_single_pass(Some(single));
    let zv = fusion.residual.then(|| z.view());
    let y = bn
        .forward_fused(x.view(), zv, fusion.activation, Mode::Train)
        .unwrap();
    let g = bn
        .backward_fused(x.view(), y.view(), dy.view(), fusion, Mode::Train)
        .unwrap();
    let ran = kernels(&bn);
    assert_eq!(ran == ["backward_single"], single, "{ran:?}");
    vec![
        flat(&g.dx),
        g.dz.as_ref().map(flat).unwrap_or_default(),
        g.dweight.unwrap(),
        g.dbias.unwrap(),
    ]
}

#[test]
fn fused_backwards_in_one_pass_match_those_in_passes() {
    let vec4_cases = cases()
        .into_iter()
        .filter(|c| c.3 == "forward_single")
        .take(4);
    for (i, (name, dims, layout, _)) in vec4_cases.enumerate() {
        let config = config_of(&dims, layout);
        let mut r = rng(700 + i as u64);
        let x = normal(&mut r, &dims, -1.0, 2.0);
        let z = normal(&mut r, &dims, 0.5, 1.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        for ctx in gpu_contexts() {
            for fusion in [
                Fusion::new(false, Activation::Identity),
                Fusion::new(false, Activation::Relu),
                Fusion::new(true, Activation::Relu),
                Fusion::new(true, Activation::Identity),
            ] {
                let t = (&x, &z, &dy);
                let one = fused_backward(ctx, &config, t, fusion, true);
                let passes = fused_backward(ctx, &config, t, fusion, false);
                assert_eq!(one[1].is_empty(), !fusion.residual);
                for (what, (a, b)) in ["dx", "dz", "dweight", "dbias"]
                    .iter()
                    .zip(one.iter().zip(&passes))
                {
                    all_close(what, a, b, TOL, TOL).unwrap_or_else(|e| {
                        panic!("{name} {} on {}: {e}", fusion.name(), ctx.label())
                    });
                }
            }
        }
    }
}

/// The single passes merge their threads' sums in subgroups by default on
/// lavapipe (a device with SUBGROUP and subgroups of 8) and through
/// workgroup memory elsewhere or when told (`set_subgroup_merges`), seen
/// in the pipelines' names; both merges give the same results.
#[test]
fn subgroup_merges_match_workgroup_memory() {
    use wgpu_batchnorm::wgpu::Features;
    let mut in_subgroups = 0;
    for (i, (name, dims, layout, _)) in cases().into_iter().enumerate() {
        let config = config_of(&dims, layout);
        let mut r = rng(700 + i as u64);
        let x = normal(&mut r, &dims, 3.0, 2.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        for ctx in gpu_contexts() {
            let on = format!("{name} on {}", ctx.label());
            let names = |bn: &GpuBatchNorm| -> Vec<&'static str> {
                bn.last_dispatches().iter().map(|d| d.kernel).collect()
            };
            let run = |subgroups: Option<bool>| {
                let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
                bn.set_single_pass(Some(true));
                bn.set_subgroup_merges(subgroups);
                let y = flat(&bn.forward_train(x.view()).unwrap());
                let forward = names(&bn);
                let g = bn.backward(x.view(), dy.view(), Mode::Train).unwrap();
                let backward = names(&bn);
                let s = bn.state().unwrap();
                let out = vec![
                    y,
                    s.running_mean.unwrap(),
                    s.running_var.unwrap(),
                    flat(&g.dx),
                    g.dweight.unwrap(),
                    g.dbias.unwrap(),
                ];
                (out, forward, backward)
            };
            let merged_in_subgroups = |ran: &[&str]| {
                let single: Vec<_> = ran.iter().filter(|k| k.contains("_single")).collect();
                assert!(!single.is_empty(), "{on}: {ran:?}");
                let sub = single.iter().filter(|k| k.contains("_subgroup")).count();
                assert!(sub == 0 || sub == single.len(), "{on}: {ran:?}");
                sub > 0
            };
            let (default, forward, backward) = run(None);
            let (memory, forward_m, backward_m) = run(Some(false));
            let (_, forward_s, _) = run(Some(true));
            let lavapipe = is_lavapipe(ctx);
            assert_eq!(merged_in_subgroups(&forward), lavapipe, "{on}: {forward:?}");
            assert!(!merged_in_subgroups(&forward_m), "{on}: {forward_m:?}");
            let has = ctx.features().contains(Features::SUBGROUP);
            assert_eq!(merged_in_subgroups(&forward_s), has, "{on}: {forward_s:?}");
            if backward.iter().any(|k| k.starts_with("backward_single")) {
                assert_eq!(
                    merged_in_subgroups(&backward),
                    lavapipe,
                    "{on}: {backward:?}"
                );
                assert!(!merged_in_subgroups(&backward_m), "{on}: {backward_m:?}");
            }
            in_subgroups += usize::from(merged_in_subgroups(&forward));
            let what = ["y", "running_mean", "running_var", "dx", "dweight", "dbias"];
            for (what, (a, b)) in what.iter().zip(default.iter().zip(&memory)) {
                all_close(what, a, b, TOL, TOL).unwrap_or_else(|e| panic!("{on}: {e}"));
            }
        }
    }
    let lavapipe = gpu_contexts().iter().filter(|c| is_lavapipe(c)).count();
    assert_eq!(in_subgroups, lavapipe * cases().len());
}

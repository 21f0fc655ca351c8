//! BatchNorm fused with the residual add and ReLU, `y = act(BN(x) + z)`, on
//! every adapter: each fusion, mode, layout and storage type against the CPU
//! reference's plain forward and backward with the add, the ReLU and the
//! gate done on the host in f64; bindings cut in chunks; bad tensors refused
//! with nothing recorded and nothing changed; NaN kept in its channel; a
//! device too small for the fused backward's reductions.

mod common;
use common::*;
use ndarray::{ArrayD, Dimension};
use wgpu_batchnorm::{
    Activation, AdapterSelection, BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference,
    DType, Error, FusedGradients, Fusion, GpuBatchNorm, GpuContext, GpuSavedStats, GpuTensor,
    Layout, Mode,
};

/// f16 tolerance of shared/FIXTURES.md, for the big tensors.
const TOL_F16: f32 = 5e-3;

/// The expected results of fused calls: the CPU reference's plain
/// operations on inputs rounded to the storage type, the add, the ReLU and
/// the gate in f64 on the host, outputs rounded to the storage type.
struct Expect {
    reference: CpuReference,
    dtype: DType,
}

impl Expect {
    fn new(config: &BatchNormConfig, state: &BatchNormState, dtype: DType) -> Self {
        let mut reference = CpuReference::new(config.clone()).unwrap();
        reference.set_state(state).unwrap();
        Self { reference, dtype }
    }

    fn stored(&self, a: &ArrayD<f32>) -> ArrayD<f32> {
        a.mapv(|v| self.dtype.round(v))
    }

    /// `act(BN(x) + z)` in `mode`.
    fn forward(
        &mut self,
        x: &ArrayD<f32>,
        z: Option<&ArrayD<f32>>,
        activation: Activation,
        mode: Mode,
    ) -> ArrayD<f32> {
        let xs = self.stored(x);
        let bn = match mode {
            Mode::Train => self.reference.forward_train(xs.view()),
            Mode::Eval => self.reference.forward_eval(xs.view()),
        }
        .unwrap();
        let fusion = Fusion::new(z.is_some(), activation);
        let zs = z.map_or_else(|| ArrayD::zeros(x.shape()), |z| self.stored(z));
        let mut y = bn.clone();
        ndarray::Zip::from(&mut y)
            .and(&bn)
            .and(&zs)
            .for_each(|y, &b, &z| {
                let v = fusion.apply(f64::from(b), f64::from(z));
                *y = self.dtype.round(v as f32);
            });
        y
    }

    /// The backward of the last forward at output `y`: the gated `dy`, the
    /// reference's plain backward of it.
    fn backward(
        &mut self,
        x: &ArrayD<f32>,
        y: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        fusion: Fusion,
        mode: Mode,
    ) -> FusedGradients {
        let (ys, dys) = (self.stored(y), self.stored(dy));
        let mut g = dys.clone();
        ndarray::Zip::from(&mut g)
            .and(&ys)
            .and(&dys)
            .for_each(|g, &y, &d| {
                *g = fusion.activation.gate(f64::from(y), f64::from(d)) as f32;
            });
        let grads = self
            .reference
            .backward(self.stored(x).view(), g.view(), mode)
            .unwrap();
        FusedGradients {
            dx: self.stored(&grads.dx),
            dz: fusion.residual.then_some(g),
            dweight: grads.dweight,
            dbias: grads.dbias,
        }
    }
}

/// `got` against `want` at the tolerance of `dtype` for the big tensors.
fn close(what: &str, got: &[f32], want: &[f32], dtype: DType) {
    let tol = if dtype == DType::F16 { TOL_F16 } else { TOL };
    all_close(what, got, want, tol, tol).unwrap_or_else(|e| panic!("{e}"));
}

/// Every fused result of a backend against `Expect`'s; `dz` bit for bit (a
/// gate only selects).
fn check_grads(on: &str, got: &FusedGradients, want: &FusedGradients, dtype: DType) {
    close(&format!("{on} dx"), &flat(&got.dx), &flat(&want.dx), dtype);
    match (&got.dz, &want.dz) {
        (Some(g), Some(w)) => {
            let (g, w) = (flat(g), flat(w));
            let same = g
                .iter()
                .zip(&w)
                .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
            assert!(same, "{on} dz: {g:?}\nwant {w:?}");
        }
        (None, None) => {}
        (g, w) => panic!("{on}: dz {g:?}, expected {w:?}"),
    }
    for (what, g, w) in [
        ("dweight", &got.dweight, &want.dweight),
        ("dbias", &got.dbias, &want.dbias),
    ] {
        assert_eq!(g.is_some(), w.is_some(), "{on} {what}");
        if let (Some(g), Some(w)) = (g, w) {
            all_close(&format!("{on} {what}"), g, w, TOL, TOL).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The f16 kernel sets of `ctx`, as `set_packed_f16` arguments: its own
/// (WGSL's `f16` with SHADER_F16, else the packed ones), and with
/// SHADER_F16 the packed ones too.
fn f16_sets(ctx: &GpuContext) -> Vec<bool> {
    if ctx.features().contains(wgpu::Features::SHADER_F16) {
        vec![false, true]
    } else {
        vec![false]
    }
}

/// Fails when CI expects GPUs and none ran f16, or expects an adapter with
/// SHADER_F16 and none has it.
fn expect_f16_ran(ran: usize) {
    if gpu_required() {
        assert!(ran > 0, "no adapter ran f16");
    }
    if std::env::var("BNORM_EXPECT_F16").is_ok_and(|v| !v.is_empty()) {
        let native = gpu_contexts().iter().any(|c| f16_sets(c).len() == 2);
        assert!(
            native,
            "BNORM_EXPECT_F16 is set but no adapter has SHADER_F16"
        );
    }
}

/// Each fusion in training and evaluation, one after the other on one layer
/// (the running statistics move with each training forward), through the
/// ndarray interface; the state at the end. `packed`: f16 through the packed
/// kernels.
fn parity(
    ctx: &GpuContext,
    name: &str,
    config: &BatchNormConfig,
    dims: &[usize],
    (dtype, packed): (DType, bool),
) {
    let mut r = rng(dims.iter().sum::<usize>() as u64 + 7 * config.num_features as u64);
    let state = random_state(&mut r, config, 2);
    let mut gpu = GpuBatchNorm::new(ctx, config.clone()).unwrap();
    gpu.set_state(&state).unwrap();
    gpu.set_storage_dtype(dtype).unwrap();
    gpu.set_packed_f16(packed).unwrap();
    let mut want = Expect::new(config, &state, dtype);
    for fusion in Fusion::ALL {
        for mode in [Mode::Train, Mode::Eval] {
            let on = format!(
                "{name} {dtype} (packed {packed}) {} {mode:?} on {}",
                fusion.name(),
                ctx.label()
            );
            let x = normal(&mut r, dims, 0.5, 1.5);
            let z = fusion.residual.then(|| normal(&mut r, dims, 0.0, 1.0));
            let dy = normal(&mut r, dims, 0.0, 1.0);
            let act = fusion.activation;
            let zv = z.as_ref().map(|z| z.view());
            let y = gpu.forward_fused(x.view(), zv, act, mode).unwrap();
            let y_want = want.forward(&x, z.as_ref(), act, mode);
            close(&format!("{on} y"), &flat(&y), &flat(&y_want), dtype);
            if act == Activation::Relu {
                // the mask has both sides
                assert!(y.iter().any(|&v| v == 0.0), "{on}: no y stopped");
                assert!(y.iter().any(|&v| v > 0.0), "{on}: no y passed");
            }
            let got = gpu
                .backward_fused(x.view(), y.view(), dy.view(), fusion, mode)
                .unwrap();
            let expected = want.backward(&x, &y, &dy, fusion, mode);
            check_grads(&on, &got, &expected, dtype);
        }
    }
    let (s, w) = (gpu.state().unwrap(), want.reference.state().unwrap());
    assert_eq!(s.num_batches_tracked, w.num_batches_tracked, "{name}");
    for (what, g, w) in [
        ("running_mean", &s.running_mean, &w.running_mean),
        ("running_var", &s.running_var, &w.running_var),
    ] {
        if let (Some(g), Some(w)) = (g, w) {
            all_close(&format!("{name} {what}"), g, w, TOL, TOL).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// `(name, shape, layout)`: vec4 items of one channel, of four channels
/// (channels-last), single elements both ways.
fn shapes() -> Vec<(&'static str, Vec<usize>, Layout)> {
    vec![
        ("nchw_vec4", vec![3, 4, 4, 4], Layout::ChannelsFirst),
        ("nchw_scalar", vec![3, 5, 7], Layout::ChannelsFirst),
        ("nhwc_vec4", vec![2, 3, 5, 8], Layout::ChannelsLast),
        ("nlc_scalar", vec![4, 5, 3], Layout::ChannelsLast),
    ]
}

fn channels(dims: &[usize], layout: Layout) -> usize {
    match layout {
        Layout::ChannelsFirst => dims[1],
        Layout::ChannelsLast => dims[dims.len() - 1],
    }
}

#[test]
fn every_fusion_mode_layout_and_dtype_matches_the_reference() {
    let mut f16_ran = 0;
    for ctx in gpu_contexts() {
        for (name, dims, layout) in shapes() {
            let config = BatchNormConfig::new(channels(&dims, layout)).with_layout(layout);
            parity(ctx, name, &config, &dims, (DType::F32, false));
            for packed in f16_sets(ctx) {
                parity(ctx, name, &config, &dims, (DType::F16, packed));
                f16_ran += 1;
            }
        }
    }
    expect_f16_ran(f16_ran);
}

/// Without affine parameters an evaluation backward on the running
/// statistics needs no sums, yet the fused one runs its reductions for the
/// gate; without tracked statistics evaluation uses the batch's.
#[test]
fn every_config_flag_with_fusion() {
    for ctx in gpu_contexts() {
        for (name, dims, layout) in [&shapes()[0], &shapes()[3]] {
            let base = BatchNormConfig::new(channels(dims, *layout)).with_layout(*layout);
            let configs = [
                ("affine_off", base.clone().with_affine(false)),
                ("tracking_off", base.clone().with_track_running_stats(false)),
                ("momentum_none", base.clone().with_momentum(None)),
            ];
            for (flag, config) in configs {
                parity(
                    ctx,
                    &format!("{name} {flag}"),
                    &config,
                    dims,
                    (DType::F32, false),
                );
            }
        }
    }
}

/// A binding cap that cuts a tensor of `dims` into about three chunks of
/// whole rows, no smaller than the fewest rows any adapter's offset
/// alignment allows (as tests/grids.rs).
fn cap_for(dims: &[usize], layout: Layout, size: u64) -> u64 {
    let len: u64 = dims.iter().map(|&d| d as u64).product();
    let row = channels(dims, layout) as u64
        * match layout {
            Layout::ChannelsFirst => dims[2..].iter().product::<usize>() as u64,
            Layout::ChannelsLast => 1,
        };
    let row = row * size;
    let fewest = gpu_contexts()
        .iter()
        .map(|ctx| {
            let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment).max(4);
            let mut g = (row, align);
            while g.1 != 0 {
                g = (g.1, g.0 % g.1);
            }
            align / g.0 * row
        })
        .max()
        .unwrap_or(row);
    (len * size / 3).max(fewest)
}

/// The kernels of the last call, `_f16`, `_f16_packed`, `_subgroup`,
/// `_gated` and `_in_place` taken off.
fn kernels(bn: &GpuBatchNorm) -> Vec<String> {
    bn.last_dispatches()
        .iter()
        .map(|d| {
            kernel_name(d.kernel)
                .replace("_gated", "")
                .replace("_in_place", "")
        })
        .collect()
}

/// Chunked bindings, through the device-resident API: the fused passes
/// bind the chunks as the plain ones do (the same dispatches, the gated
/// reduction in place of the plain one, no pass more), the results match the
/// reference, and a second recording creates nothing.
#[test]
fn chunked_bindings_fuse_like_whole_ones() {
    let cases = [
        ("nchw_vec4", vec![12, 4, 8, 8], Layout::ChannelsFirst),
        ("nhwc_vec4", vec![6, 4, 4, 16], Layout::ChannelsLast),
        ("nchw_scalar", vec![140, 3, 35], Layout::ChannelsFirst),
    ];
    for ctx in gpu_contexts() {
        for (i, (name, dims, layout)) in cases.iter().enumerate() {
            let config = BatchNormConfig::new(channels(dims, *layout)).with_layout(*layout);
            let mut r = rng(300 + i as u64);
            let state = random_state(&mut r, &config, 1);
            let x = normal(&mut r, dims, 2.0, 1.5);
            let z = normal(&mut r, dims, 0.0, 1.0);
            let dy = normal(&mut r, dims, 0.0, 1.0);
            let up = |a: &ArrayD<f32>| GpuTensor::from_array(ctx, a.view(), *layout).unwrap();
            let (gx, gz, gdy) = (up(&x), up(&z), up(&dy));
            let cap = cap_for(dims, *layout, 4);
            let layer = || {
                let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
                bn.set_state(&state).unwrap();
                bn.set_slice_len(Some(64)).unwrap();
                bn.set_max_binding_bytes(Some(cap)).unwrap();
                bn
            };
            // the plain passes of the same shape
            let mut plain = layer();
            let fwd = plain.run_forward_train(&gx).unwrap();
            let plain_forward = kernels(&plain);
            plain.run_backward(&gx, &gdy, &fwd.saved).unwrap();
            let plain_backward = kernels(&plain);
            let chunks = plain_backward
                .iter()
                .filter(|k| k.starts_with("backward_dx"))
                .count();
            assert!(chunks >= 2, "{name}: {plain_backward:?}");

            for fusion in [
                Fusion::new(true, Activation::Relu),
                Fusion::new(false, Activation::Relu),
                Fusion::new(true, Activation::Identity),
            ] {
                let on = format!("{name} {} on {}", fusion.name(), ctx.label());
                let mut bn = layer();
                let mut want = Expect::new(&config, &state, DType::F32);
                let zt = fusion.residual.then_some(&gz);
                let f = bn
                    .run_forward_train_fused(&gx, zt, fusion.activation)
                    .unwrap();
                assert_eq!(kernels(&bn), plain_forward, "{on}");
                let zs = fusion.residual.then_some(&z);
                let y_want = want.forward(&x, zs, fusion.activation, Mode::Train);
                let y = f.y.to_array().unwrap();
                close(&format!("{on} y"), &flat(&y), &flat(&y_want), DType::F32);

                let g = bn
                    .run_backward_fused(&gx, &f.y, &gdy, fusion, &f.saved)
                    .unwrap();
                assert_eq!(kernels(&bn), plain_backward, "{on}");
                let variant = |v: &str| bn.last_dispatches().iter().any(|d| d.kernel.contains(v));
                assert!(variant("_gated"), "{on}: {:?}", bn.last_dispatches());
                // without a residual dx is the gated dy's scratch, read in place
                assert_eq!(
                    variant("_in_place"),
                    !fusion.residual,
                    "{on}: {:?}",
                    bn.last_dispatches()
                );
                let got = FusedGradients {
                    dx: g.grads.dx.to_array().unwrap(),
                    dz: g.dz.map(|t| t.to_array().unwrap()),
                    dweight: g.grads.dweight.map(|t| t.to_vec().unwrap()),
                    dbias: g.grads.dbias.map(|t| t.to_vec().unwrap()),
                };
                let expected = want.backward(&x, &y, &dy, fusion, Mode::Train);
                check_grads(&on, &got, &expected, DType::F32);

                // recording again into the same tensors creates nothing
                let out = GpuTensor::uninit(ctx, dims, *layout).unwrap();
                let dx = GpuTensor::uninit(ctx, dims, *layout).unwrap();
                let dz = GpuTensor::uninit(ctx, dims, *layout).unwrap();
                let dz = fusion.residual.then_some(&dz);
                let mut saved = GpuSavedStats::new(&bn).unwrap();
                let mut record = |bn: &mut GpuBatchNorm| {
                    ctx.run("fused step", |enc| {
                        let s = Some(&mut saved);
                        bn.record_forward_train_fused(enc, &gx, zt, fusion.activation, &out, s)?;
                        bn.record_backward_fused(enc, &gx, &out, &gdy, fusion, &saved, &dx, dz)
                    })
                    .unwrap();
                };
                record(&mut bn);
                let counts = bn.resource_counts();
                record(&mut bn);
                assert_eq!(bn.resource_counts(), counts, "{on}");
            }
        }
    }
}

/// f16 bound in chunks gives what f16 bound whole gives, with every f16
/// kernel set, for vec4 items and (odd rows, an odd-length last chunk) for
/// single elements.
#[test]
fn f16_chunks_fuse_like_f16_whole() {
    for (dims, layout) in [
        (vec![12, 4, 8, 8], Layout::ChannelsFirst),
        (vec![141, 3, 35], Layout::ChannelsFirst),
    ] {
        f16_chunks_fuse_like_f16_whole_for(&dims, layout);
    }
}

fn f16_chunks_fuse_like_f16_whole_for(dims: &[usize], layout: Layout) {
    let config = BatchNormConfig::new(dims[1]);
    let mut r = rng(77);
    let x = normal(&mut r, dims, 1.0, 2.0);
    let z = normal(&mut r, dims, 0.0, 1.0);
    let dy = normal(&mut r, dims, 0.0, 1.0);
    let mut ran = 0;
    for (ctx, packed) in gpu_contexts()
        .iter()
        .flat_map(|c| f16_sets(c).into_iter().map(move |p| (c, p)))
    {
        let run = |cap: Option<u64>, z: Option<&ArrayD<f32>>| {
            let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            bn.set_storage_dtype(DType::F16).unwrap();
            bn.set_packed_f16(packed).unwrap();
            bn.set_max_binding_bytes(cap).unwrap();
            let y = bn
                .forward_fused(x.view(), z.map(|z| z.view()), Activation::Relu, Mode::Train)
                .unwrap();
            let f = Fusion::new(z.is_some(), Activation::Relu);
            let g = bn
                .backward_fused(x.view(), y.view(), dy.view(), f, Mode::Train)
                .unwrap();
            let chunks = kernels(&bn)
                .iter()
                .filter(|k| k.starts_with("backward_partial") || k.starts_with("backward_single"))
                .count();
            (flat(&y), g, chunks)
        };
        let on = format!("{dims:?} on {} (packed {packed})", ctx.label());
        for zz in [None, Some(&z)] {
            let whole = run(None, zz);
            let chunked = run(Some(cap_for(dims, layout, 2)), zz);
            assert_eq!(whole.2, 1);
            assert!(chunked.2 >= 2, "{on}: {} chunks", chunked.2);
            let close = |what: &str, a: &[f32], b: &[f32], tol: f32| {
                all_close(what, a, b, tol, tol).unwrap_or_else(|e| panic!("{on}: {e}"));
            };
            close("y", &chunked.0, &whole.0, 2e-3);
            close("dx", &flat(&chunked.1.dx), &flat(&whole.1.dx), 2e-3);
            assert_eq!(chunked.1.dz, whole.1.dz, "{on}");
            let (dw, dw_whole) = (chunked.1.dweight.unwrap(), whole.1.dweight.unwrap());
            close("dweight", &dw, &dw_whole, 1e-3);
        }
        ran += 1;
    }
    expect_f16_ran(ran);
}

/// Everything a failed call could have changed.
fn snapshot(bn: &GpuBatchNorm, saved: &GpuSavedStats) -> String {
    format!(
        "{:?} {:?} {:?} {:?}",
        bn.state().unwrap(),
        bn.num_batches_tracked().unwrap(),
        saved.dims(),
        bn.last_dispatches()
    )
}

/// Bad `z`, `y` and `dz` tensors are refused with the tensor named, before
/// anything is recorded: the encoder, when submitted, writes nothing, and
/// the layer and the saved statistics are as they were.
#[test]
fn bad_fused_tensors_are_refused_and_change_nothing() {
    let (dims, layout) = (vec![2, 4, 3], Layout::ChannelsFirst);
    let config = BatchNormConfig::new(4);
    let mut r = rng(5);
    let x = normal(&mut r, &dims, 0.0, 1.0);
    for ctx in gpu_contexts() {
        let on = ctx.label();
        let up = |d: &[usize], dtype| {
            let n = d.iter().product::<usize>();
            GpuTensor::from_slice_as(ctx, &vec![1.0; n], d, layout, dtype).unwrap()
        };
        let gx = GpuTensor::from_array(ctx, x.view(), layout).unwrap();
        let (good, short) = (up(&dims, DType::F32), up(&[2, 4, 2], DType::F32));
        let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        let mut saved = GpuSavedStats::new(&bn).unwrap();
        let y = GpuTensor::uninit(ctx, &dims, layout).unwrap();
        ctx.run("train", |enc| {
            bn.record_forward_train(enc, &gx, &y, Some(&mut saved))
        })
        .unwrap();
        let relu = Activation::Relu;
        let add_relu = Fusion::new(true, relu);
        // a poisoned output shows whether a refused recording wrote it
        let out = GpuTensor::from_slice(ctx, &vec![-7.0; x.len()], &dims, layout).unwrap();
        let dz = GpuTensor::from_slice(ctx, &vec![-7.0; x.len()], &dims, layout).unwrap();
        let f16_cases = vec![up(&dims, DType::F16)];
        let (gx, good, short, out, dz) = (&gx, &good, &short, &out, &dz);
        type Call<'a> = Box<
            dyn Fn(
                    &mut GpuBatchNorm,
                    &mut wgpu::CommandEncoder,
                    &mut GpuSavedStats,
                ) -> wgpu_batchnorm::Result<()>
                + 'a,
        >;
        let mut cases: Vec<(&str, &str, Call<'_>)> = vec![
            (
                "z of another shape",
                "z",
                Box::new(move |bn, enc, s| {
                    bn.record_forward_train_fused(enc, gx, Some(short), relu, out, Some(s))
                }),
            ),
            (
                "z in y's buffer",
                "z",
                Box::new(move |bn, enc, s| {
                    bn.record_forward_eval_fused(enc, gx, Some(out), relu, out, Some(s))
                }),
            ),
            (
                "y of another shape",
                "y",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, short, good, add_relu, s, out, Some(dz))
                }),
            ),
            (
                "dz of another shape",
                "dz",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, good, good, add_relu, s, out, Some(short))
                }),
            ),
            (
                "no dz with a residual",
                "dz",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, good, good, add_relu, s, out, None)
                }),
            ),
            (
                "dz without a residual",
                "dz",
                Box::new(move |bn, enc, s| {
                    let f = Fusion::new(false, relu);
                    bn.record_backward_fused(enc, gx, good, good, f, s, out, Some(dz))
                }),
            ),
            (
                "dz in dx's buffer",
                "dz",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, good, good, add_relu, s, out, Some(out))
                }),
            ),
            (
                "dz in y's buffer",
                "dz",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, dz, good, add_relu, s, out, Some(dz))
                }),
            ),
        ];
        for h in &f16_cases {
            cases.push((
                "f16 z",
                "z",
                Box::new(move |bn, enc, s| {
                    bn.record_forward_train_fused(enc, gx, Some(h), relu, out, Some(s))
                }),
            ));
            cases.push((
                "f16 y",
                "y",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, h, good, add_relu, s, out, Some(dz))
                }),
            ));
            cases.push((
                "f16 dz",
                "dz",
                Box::new(move |bn, enc, s| {
                    bn.record_backward_fused(enc, gx, good, good, add_relu, s, out, Some(h))
                }),
            ));
        }
        for (case, needle, call) in &cases {
            let before = snapshot(&bn, &saved);
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            let e =
                call(&mut bn, &mut enc, &mut saved).expect_err(&format!("{on}: {case} accepted"));
            let msg = e.to_string();
            assert!(msg.contains(needle), "{on}: {case}: {msg}");
            let kind_ok = match *case {
                "no dz with a residual" | "dz without a residual" => {
                    matches!(e, Error::FusedGradient { .. })
                }
                c if c.contains("buffer") => matches!(e, Error::BufferAlias { .. }),
                c if c.starts_with("f16") => matches!(e, Error::DTypeMismatch { .. }),
                _ => matches!(e, Error::ShapeMismatch { .. }),
            };
            assert!(kind_ok, "{on}: {case}: {e:?}");
            ctx.queue().submit([enc.finish()]);
            assert_eq!(
                snapshot(&bn, &saved),
                before,
                "{on}: {case} changed the layer"
            );
            for t in [out, dz] {
                assert!(
                    t.to_vec().unwrap().iter().all(|&v| v == -7.0),
                    "{on}: {case} wrote"
                );
            }
        }

        // and through the ndarray interface
        let mut b = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        b.forward_train(x.view()).unwrap();
        let before = (b.state().unwrap(), b.saved_stats().unwrap());
        let bad = ArrayD::<f32>::zeros(vec![2, 4, 2]);
        let e = b
            .forward_fused(x.view(), Some(bad.view()), relu, Mode::Train)
            .unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains('z'),
            "{on}: {e}"
        );
        let e = b
            .backward_fused(x.view(), bad.view(), x.view(), add_relu, Mode::Train)
            .unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains('y'),
            "{on}: {e}"
        );
        assert_eq!(
            (b.state().unwrap(), b.saved_stats().unwrap()),
            before,
            "{on}"
        );
    }
}

/// A NaN in `x` spoils its own channel and a NaN in `z` its own element
/// (and the gradients of its channel's statistics), nothing else: the ReLU
/// keeps NaN, and a NaN `y` lets `dy` through; in f32 and in f16 with
/// every f16 kernel set.
#[test]
fn nan_stays_in_its_channel() {
    for (dims, layout) in [
        (vec![4, 3, 5], Layout::ChannelsFirst),
        (vec![4, 5, 3], Layout::ChannelsLast),
    ] {
        let config = BatchNormConfig::new(3).with_layout(layout);
        let mut r = rng(9);
        let state = random_state(&mut r, &config, 1);
        let mut x = normal(&mut r, &dims, 0.0, 1.0);
        let mut z = normal(&mut r, &dims, 0.0, 1.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        let at = |c: usize, k: usize| -> Vec<usize> {
            match layout {
                Layout::ChannelsFirst => vec![k % 4, c, k % 5],
                Layout::ChannelsLast => vec![k % 4, k % 5, c],
            }
        };
        x[at(0, 2).as_slice()] = f32::NAN;
        z[at(1, 3).as_slice()] = f32::NAN;
        let channel = |i: &[usize]| match layout {
            Layout::ChannelsFirst => i[1],
            Layout::ChannelsLast => i[2],
        };
        let fusion = Fusion::new(true, Activation::Relu);
        let runs = gpu_contexts().iter().flat_map(|c| {
            let f16 = f16_sets(c).into_iter().map(|p| (DType::F16, p));
            std::iter::once((DType::F32, false))
                .chain(f16)
                .map(move |s| (c, s))
        });
        for (ctx, (dtype, packed)) in runs {
            let on = format!("{layout:?} {dtype} (packed {packed}) on {}", ctx.label());
            let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            bn.set_state(&state).unwrap();
            bn.set_storage_dtype(dtype).unwrap();
            bn.set_packed_f16(packed).unwrap();
            let mut want = Expect::new(&config, &state, dtype);
            let y = bn
                .forward_fused(x.view(), Some(z.view()), Activation::Relu, Mode::Train)
                .unwrap();
            let y_want = want.forward(&x, Some(&z), Activation::Relu, Mode::Train);
            close(&format!("{on} y"), &flat(&y), &flat(&y_want), dtype);
            for (i, &v) in y.indexed_iter() {
                let c = channel(i.slice());
                let nan_here = c == 0 || i.slice() == at(1, 3).as_slice();
                assert_eq!(v.is_nan(), nan_here, "{on}: y{:?} = {v}", i.slice());
            }
            let g = bn
                .backward_fused(x.view(), y.view(), dy.view(), fusion, Mode::Train)
                .unwrap();
            check_grads(
                &on,
                &g,
                &want.backward(&x, &y, &dy, fusion, Mode::Train),
                dtype,
            );
            let dz = g.dz.as_ref().unwrap();
            for (i, &v) in g.dx.indexed_iter() {
                let c = channel(i.slice());
                assert_eq!(v.is_nan(), c == 0, "{on}: dx{:?} = {v}", i.slice());
                if c == 0 || i.slice() == at(1, 3).as_slice() {
                    // a NaN y lets dy through
                    let dy_stored = dtype.round(dy[i.slice()]);
                    assert_eq!(dz[i.slice()], dy_stored, "{on}: dz{:?}", i.slice());
                }
            }
            let dw = g.dweight.unwrap();
            assert!(
                dw[0].is_nan() && dw[1..].iter().all(|v| v.is_finite()),
                "{on}: {dw:?}"
            );
        }
    }
}

/// On a device opened with the 4 storage buffers per stage the crate asks
/// for, the fused forward runs and the fused backward, whose reductions bind
/// 6, is refused by name and changes nothing; the plain backward runs.
#[test]
fn a_device_without_six_storage_buffers_refuses_the_fused_backward() {
    for ctx in gpu_contexts() {
        let on = ctx.label();
        let adapter = wgpu_batchnorm::gpu::enumerate_adapters(&AdapterSelection::from_env())
            .into_iter()
            .find(|a| {
                let info = a.get_info();
                info.name == ctx.name() && info.backend == ctx.adapter_info().backend
            })
            .unwrap_or_else(|| panic!("{on}: adapter not enumerated again"));
        let limits = GpuContext::required_limits().or_worse_values_from(&adapter.limits());
        assert_eq!(limits.max_storage_buffers_per_shader_stage, 4, "{on}");
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("small device"),
            required_limits: limits,
            ..Default::default()
        }))
        .unwrap();
        let small = GpuContext::from_device(&device, &queue).unwrap();
        let (dims, layout) = (vec![3, 4, 4, 4], Layout::ChannelsFirst);
        let mut r = rng(21);
        let (x, z, dy) = (
            normal(&mut r, &dims, 0.0, 1.0),
            normal(&mut r, &dims, 0.0, 1.0),
            normal(&mut r, &dims, 0.0, 1.0),
        );
        let up = |a: &ArrayD<f32>| GpuTensor::from_array(&small, a.view(), layout).unwrap();
        let (gx, gz, gdy) = (up(&x), up(&z), up(&dy));
        let config = BatchNormConfig::new(4);
        let mut bn = GpuBatchNorm::new(&small, config.clone()).unwrap();
        let mut want = Expect::new(&config, &BatchNormState::new(&config), DType::F32);
        let f = bn
            .run_forward_train_fused(&gx, Some(&gz), Activation::Relu)
            .unwrap();
        let y = f.y.to_array().unwrap();
        let y_want = want.forward(&x, Some(&z), Activation::Relu, Mode::Train);
        close(&format!("{on} y"), &flat(&y), &flat(&y_want), DType::F32);
        let state = bn.state().unwrap();
        let fusion = Fusion::new(true, Activation::Relu);
        let e = bn
            .run_backward_fused(&gx, &f.y, &gdy, fusion, &f.saved)
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{on}: {e:?}");
        assert!(
            e.to_string()
                .contains("max_storage_buffers_per_shader_stage"),
            "{on}: {e}"
        );
        assert_eq!(bn.state().unwrap(), state, "{on}");
        // the plain backward, as a fused one without a fusion
        let g = bn
            .run_backward_fused(&gx, &f.y, &gdy, Fusion::default(), &f.saved)
            .unwrap();
        assert!(g.dz.is_none());
        let expected = want.backward(&x, &y, &dy, Fusion::default(), Mode::Train);
        close(
            &format!("{on} dx"),
            &flat(&g.grads.dx.to_array().unwrap()),
            &flat(&expected.dx),
            DType::F32,
        );
    }
}

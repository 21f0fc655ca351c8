//! f16 storage on every adapter: parity with the reference (which emulates
//! f16 storage) through WGSL's `f16` where the adapter has SHADER_F16 and
//! through the packed kernels (pairs of f16 in `u32` words) everywhere, the
//! two alike on one device, and the bytes past an odd-length tensor's end
//! left as they were.

mod common;
use common::*;
use ndarray::ArrayD;
use wgpu_batchnorm::{
    Activation, AdapterSelection, BatchNormBackend, BatchNormConfig, CpuReference, DType, Error,
    Fusion, GpuBatchNorm, GpuContext, GpuSavedStats, GpuTensor, Layout, Mode,
};

/// f16 tolerance of shared/FIXTURES.md, for the big tensors.
const TOL_F16: f32 = 5e-3;

fn is_big(name: &str) -> bool {
    name.starts_with("y") || name.starts_with("dx")
}

fn has_shader_f16(ctx: &GpuContext) -> bool {
    ctx.features().contains(wgpu::Features::SHADER_F16)
}

/// The f16 kernel sets of `ctx`, as `set_packed_f16` arguments: its own
/// (WGSL's `f16` with SHADER_F16, else packed), and with SHADER_F16 the
/// packed ones too.
fn f16_sets(ctx: &GpuContext) -> Vec<bool> {
    if has_shader_f16(ctx) {
        vec![false, true]
    } else {
        vec![false]
    }
}

/// The suffix of the element kernels a layer runs on `ctx` by default: the
/// packed ones without SHADER_F16, and on lavapipe (a CPU adapter on Vulkan).
fn default_suffix(ctx: &GpuContext) -> &'static str {
    suffix(ctx, is_lavapipe(ctx))
}

/// The suffix of the element kernels a layer with `packed` runs on `ctx`.
fn suffix(ctx: &GpuContext, packed: bool) -> &'static str {
    if packed || !has_shader_f16(ctx) {
        "_f16_packed"
    } else {
        "_f16"
    }
}

/// Every element pass of the layer's last call ran the kernels of `suffix`.
fn assert_kernels(bn: &GpuBatchNorm, suffix: &str, on: &str) {
    let element = |k: &str| !k.ends_with("_finalize") && k != "eval_coeffs";
    let d = bn.last_dispatches();
    assert!(d.iter().any(|d| element(d.kernel)), "{on}: {d:?}");
    for d in d.iter().filter(|d| element(d.kernel)) {
        assert!(
            d.kernel.ends_with(suffix),
            "{on}: {} is not {suffix}",
            d.kernel
        );
    }
}

/// A layer on `ctx` with `config`, `state`, f16 storage and kernel set `packed`.
fn layer(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    state: &wgpu_batchnorm::BatchNormState,
    packed: bool,
) -> GpuBatchNorm {
    let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
    bn.set_state(state).unwrap();
    bn.set_storage_dtype(DType::F16).unwrap();
    bn.set_packed_f16(packed).unwrap();
    bn
}

/// Runs `run_all` with f16 storage on every adapter and kernel set against
/// the reference; the number of runs.
fn case(
    name: &str,
    dims: &[usize],
    config: BatchNormConfig,
    mean: f32,
    slice_len: Option<u32>,
    seed: u64,
) -> usize {
    let mut r = rng(seed);
    let state = random_state(&mut r, &config, 2);
    let x = normal(&mut r, dims, mean, 1.5);
    let dy = normal(&mut r, dims, 0.0, 1.0);
    let mut reference = CpuReference::new(config.clone()).unwrap();
    reference.set_state(&state).unwrap();
    reference.set_storage_dtype(DType::F16).unwrap();
    let want = run_all(&mut reference, &x, &dy);
    let mut checked = 0;
    for ctx in gpu_contexts() {
        for packed in f16_sets(ctx) {
            let on = format!("{name} on {} (packed {packed})", ctx.label());
            let mut bn = layer(ctx, &config, &state, packed);
            bn.set_slice_len(slice_len).unwrap();
            let got = run_all(&mut bn, &x, &dy);
            assert_kernels(&bn, suffix(ctx, packed), &on);
            assert_eq!(got.nbt, want.nbt);
            for ((k, g), (_, w)) in got.tensors.iter().zip(&want.tensors) {
                let tol = if is_big(k) { TOL_F16 } else { TOL };
                all_close(k, g, w, tol, tol).unwrap_or_else(|e| panic!("{on}: {e}"));
                if is_big(k) {
                    // outputs really are f16 values
                    assert!(
                        g.iter().all(|&v| v.is_nan() || DType::F16.round(v) == v),
                        "{on} {k}"
                    );
                }
            }
            checked += 1;
        }
    }
    checked
}

/// Name, shape, configuration, mean of the input, slice length.
type Case = (&'static str, Vec<usize>, BatchNormConfig, f32, Option<u32>);

#[test]
fn f16_parity_both_layouts_every_rank() {
    let expect_f16 = std::env::var("BNORM_EXPECT_F16").is_ok_and(|v| !v.is_empty());
    let last = |c| BatchNormConfig::new(c).with_layout(Layout::ChannelsLast);
    let cases: Vec<Case> = vec![
        ("rank2", vec![32, 8], BatchNormConfig::new(8), 0.5, None),
        // 105 elements: single-element kernels, an odd-length tensor
        (
            "rank3_odd",
            vec![3, 5, 7],
            BatchNormConfig::new(5),
            0.0,
            Some(9),
        ),
        (
            "rank4",
            vec![4, 6, 7, 9],
            BatchNormConfig::new(6),
            1.0,
            None,
        ),
        (
            "rank5",
            vec![2, 3, 4, 5, 6],
            BatchNormConfig::new(3),
            -1.0,
            Some(40),
        ),
        (
            "large_mean",
            vec![4, 3, 8, 8],
            BatchNormConfig::new(3),
            300.0,
            Some(50),
        ),
        ("nlc", vec![4, 10, 3], last(3), 0.0, None),
        ("nhwc", vec![4, 7, 9, 6], last(6), 0.5, Some(31)),
        ("ndhwc", vec![2, 4, 5, 6, 3], last(3), 0.0, None),
        // odd C channels-last: a packed word's two elements in different
        // channels, rows of odd length, 105 elements
        ("nlc_odd", vec![3, 5, 7], last(7), 0.25, Some(5)),
        ("nhwc_c5", vec![2, 3, 3, 5], last(5), 0.0, None),
        // one channel, rows of 3: a word spans two rows
        (
            "c1_rows_of_3",
            vec![7, 1, 3],
            BatchNormConfig::new(1),
            0.0,
            None,
        ),
        (
            "affine_off",
            vec![4, 4, 5, 6],
            BatchNormConfig::new(4).with_affine(false),
            0.0,
            None,
        ),
        (
            "no_tracking",
            vec![4, 4, 5, 6],
            BatchNormConfig::new(4).with_track_running_stats(false),
            0.0,
            None,
        ),
        (
            "momentum_none",
            vec![4, 5, 6, 4],
            last(4).with_momentum(None),
            0.0,
            None,
        ),
    ];
    let runs: usize = gpu_contexts().iter().map(|c| f16_sets(c).len()).sum();
    for (i, (name, dims, config, mean, slice)) in cases.into_iter().enumerate() {
        let n = case(name, &dims, config, mean, slice, 100 + i as u64);
        assert_eq!(n, runs);
    }
    if expect_f16 {
        assert!(
            gpu_contexts().iter().any(has_shader_f16),
            "BNORM_EXPECT_F16 is set but no adapter has SHADER_F16"
        );
    }
    if gpu_required() {
        assert!(
            gpu_contexts().iter().any(|c| !f16_sets(c).is_empty()),
            "no adapter ran f16"
        );
    }
}

/// Every adapter stores f16: the kernels are WGSL's `f16` where it has
/// SHADER_F16 (but lavapipe), else the packed ones; `set_packed_f16` forces
/// either.
#[test]
fn every_adapter_stores_f16_with_its_kernels() {
    let mut r = rng(3);
    let x = normal(&mut r, &[4, 3, 8], 0.0, 1.0);
    for ctx in gpu_contexts() {
        let on = ctx.label();
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        bn.set_storage_dtype(DType::F16).unwrap();
        assert_eq!(bn.storage_dtype(), DType::F16);
        let h = GpuTensor::from_array_as(ctx, x.view(), Layout::ChannelsFirst, DType::F16).unwrap();
        let fwd = bn.run_forward_train(&h).unwrap();
        assert_eq!(fwd.y.dtype(), DType::F16);
        assert_kernels(&bn, default_suffix(ctx), &on);
        for packed in [true, false] {
            bn.set_packed_f16(packed).unwrap();
            bn.run_backward(&h, &fwd.y, &fwd.saved).unwrap();
            assert_kernels(&bn, suffix(ctx, packed), &on);
        }
        // f32 tensors keep their kernels
        bn.set_packed_f16(true).unwrap();
        let x32 = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        bn.run_forward_train(&x32).unwrap();
        assert!(
            bn.last_dispatches()
                .iter()
                .all(|d| !d.kernel.contains("_f16")),
            "{on}: {:?}",
            bn.last_dispatches()
        );
    }
}

/// On an adapter with SHADER_F16, the packed kernels give what WGSL's `f16`
/// gives, within the f16 tolerance, for every pass, fusion and layout,
/// including the single-element kernels of odd shapes.
#[test]
fn packed_f16_matches_native_f16() {
    let last = |c| BatchNormConfig::new(c).with_layout(Layout::ChannelsLast);
    let cases = [
        ("nchw_vec4", vec![3, 4, 4, 4], BatchNormConfig::new(4)),
        ("nchw_odd", vec![3, 5, 7], BatchNormConfig::new(5)),
        ("nhwc_vec4", vec![2, 3, 5, 8], last(8)),
        ("nlc_odd", vec![3, 5, 7], last(7)),
    ];
    let mut ran = 0;
    for ctx in gpu_contexts().iter().filter(|c| has_shader_f16(c)) {
        for (i, (name, dims, config)) in cases.iter().enumerate() {
            let mut r = rng(900 + i as u64);
            let state = random_state(&mut r, config, 1);
            let x = normal(&mut r, dims, 0.5, 1.5);
            let z = normal(&mut r, dims, 0.0, 1.0);
            let dy = normal(&mut r, dims, 0.0, 1.0);
            let run = |packed: bool| {
                let mut bn = layer(ctx, config, &state, packed);
                let mut t = run_all(&mut bn, &x, &dy).tensors;
                for fusion in Fusion::ALL {
                    let zv = fusion.residual.then(|| z.view());
                    let act = fusion.activation;
                    let y = bn.forward_fused(x.view(), zv, act, Mode::Train).unwrap();
                    let g = bn
                        .backward_fused(x.view(), y.view(), dy.view(), fusion, Mode::Train)
                        .unwrap();
                    let f = fusion.name();
                    t.push((format!("y {f}"), flat(&y)));
                    t.push((format!("dx {f}"), flat(&g.dx)));
                    t.extend(g.dz.map(|dz| (format!("dz {f}"), flat(&dz))));
                    t.extend(g.dweight.map(|w| (format!("dweight {f}"), w)));
                }
                t
            };
            let (native, packed) = (run(false), run(true));
            for ((k, p), (_, n)) in packed.iter().zip(&native) {
                let on = format!("{name} {k} on {}", ctx.label());
                let tol = if is_big(k) || k.starts_with("dz") {
                    TOL_F16
                } else {
                    TOL
                };
                all_close(&on, p, n, tol, tol).unwrap_or_else(|e| panic!("{e}"));
            }
            ran += 1;
        }
    }
    if std::env::var("BNORM_EXPECT_F16").is_ok_and(|v| !v.is_empty()) {
        assert!(
            ran > 0,
            "no adapter with SHADER_F16 compared its packed kernels"
        );
    }
}

/// Half-precision bit patterns that no output takes (a NaN payload).
const SENTINEL: u16 = 0x7e5a;

/// A buffer of `halves` f16 slots, each holding `SENTINEL`.
fn sentinel_buffer(ctx: &GpuContext, halves: usize) -> wgpu::Buffer {
    let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("sentinels"),
        size: (halves * 2) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bits = vec![SENTINEL; halves];
    ctx.queue()
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&bits));
    buffer
}

/// The bits of the f16 tensor `t`.
fn bits(t: &GpuTensor) -> Vec<u16> {
    t.to_vec_f16()
        .unwrap()
        .iter()
        .map(|h| h.to_bits())
        .collect()
}

/// The outputs of one fused training step of an odd-length f16 tensor.
struct OddStep<'a> {
    ctx: &'a GpuContext,
    config: BatchNormConfig,
    state: wgpu_batchnorm::BatchNormState,
    /// `x`, `z`, `dy`.
    inputs: [GpuTensor; 3],
    packed: bool,
}

impl OddStep<'_> {
    /// Runs the forward with `z` (when `residual`) and ReLU into `y` and
    /// its backward into `dx` (and `dz`).
    fn run(&self, residual: bool, y: &GpuTensor, dx: &GpuTensor, dz: Option<&GpuTensor>) {
        let [x, z, dy] = &self.inputs;
        let fusion = Fusion::new(residual, Activation::Relu);
        let mut bn = layer(self.ctx, &self.config, &self.state, self.packed);
        let mut saved = GpuSavedStats::new(&bn).unwrap();
        let zt = residual.then_some(z);
        self.ctx
            .run("odd step", |enc| {
                let s = Some(&mut saved);
                bn.record_forward_train_fused(enc, x, zt, fusion.activation, y, s)?;
                bn.record_backward_fused(enc, x, y, dy, fusion, &saved, dx, dz)
            })
            .unwrap();
        assert_kernels(&bn, suffix(self.ctx, self.packed), self.ctx.name());
    }
}

/// Outputs written into views of larger buffers at an aligned offset, with
/// an odd element count: the view's values are those of tensors of their
/// own, and every byte outside the view, the two after its last element
/// included, keeps its bits. Forward fused with a residual and ReLU (`y`),
/// the fused backward with a residual (`dz` from the gated reduction, `dx`)
/// and without (`dx` as the gated `dy`'s scratch, rewritten in place), in
/// both layouts (single-element kernels), with each f16 kernel set.
#[test]
fn odd_length_outputs_keep_the_bytes_past_their_end() {
    let shapes = [
        (vec![3, 5, 7], Layout::ChannelsFirst, 5),
        (vec![5, 3, 7], Layout::ChannelsLast, 7),
    ];
    for ctx in gpu_contexts() {
        let align = ctx.limits().min_storage_buffer_offset_alignment as usize;
        for (dims, layout, c) in &shapes {
            let len: usize = dims.iter().product();
            assert_eq!(len % 2, 1);
            // views from slot `align / 2` on, with `align` bytes after their end
            let (first, halves) = (align / 2, align + len + 1 + align / 2);
            let view = |b: &wgpu::Buffer| {
                GpuTensor::from_buffer(ctx, b, align as u64, dims, *layout, DType::F16).unwrap()
            };
            let own = || GpuTensor::uninit_as(ctx, dims, *layout, DType::F16).unwrap();
            let config = BatchNormConfig::new(*c).with_layout(*layout);
            let mut r = rng(len as u64 + *c as u64);
            let up = |a: &ArrayD<f32>| {
                GpuTensor::from_array_as(ctx, a.view(), *layout, DType::F16).unwrap()
            };
            let state = random_state(&mut r, &config, 1);
            let inputs =
                [(0.5, 1.5), (0.0, 1.0), (0.0, 1.0)].map(|(m, s)| up(&normal(&mut r, dims, m, s)));
            for packed in f16_sets(ctx) {
                let step = OddStep {
                    ctx,
                    config: config.clone(),
                    state: state.clone(),
                    inputs: inputs.clone(),
                    packed,
                };
                for residual in [true, false] {
                    let on = format!(
                        "{dims:?} {layout:?} residual {residual} on {} (packed {packed})",
                        ctx.label()
                    );
                    let bufs: Vec<wgpu::Buffer> =
                        (0..3).map(|_| sentinel_buffer(ctx, halves)).collect();
                    let [y, dx, dz] = [0, 1, 2].map(|i| view(&bufs[i]));
                    step.run(residual, &y, &dx, residual.then_some(&dz));
                    let alone = [own(), own(), own()];
                    let [y1, dx1, dz1] = &alone;
                    step.run(residual, y1, dx1, residual.then_some(dz1));
                    let outputs = [("y", &y), ("dx", &dx), ("dz", &dz)];
                    for (((what, t), b), alone) in outputs.iter().zip(&bufs).zip(&alone) {
                        if *what == "dz" && !residual {
                            continue;
                        }
                        let got = bits(t);
                        assert_eq!(got, bits(alone), "{on}: {what}");
                        assert!(got.iter().all(|&v| v != SENTINEL), "{on}: {what} unwritten");
                        let n = (b.size() / 2) as usize;
                        let whole = GpuTensor::from_buffer(ctx, b, 0, &[n], *layout, DType::F16);
                        for (i, &s) in bits(&whole.unwrap()).iter().enumerate() {
                            let inside = (first..first + len).contains(&i);
                            assert!(
                                inside || s == SENTINEL,
                                "{on}: {what}: slot {i} changed (the view is {first}..{})",
                                first + len
                            );
                        }
                    }
                }
            }
        }
    }
}

/// An app's device opened without SHADER_F16, on an adapter that has it,
/// runs f16 through the packed kernels, with the results of the adapter's
/// own f16 within the f16 tolerance.
#[test]
fn an_app_device_without_shader_f16_runs_the_packed_kernels() {
    let adapters = wgpu_batchnorm::gpu::enumerate_adapters(&AdapterSelection::from_env());
    let config = BatchNormConfig::new(5).with_layout(Layout::ChannelsLast);
    let mut r = rng(31);
    let state = random_state(&mut r, &config, 1);
    let x = normal(&mut r, &[3, 7, 5], 0.5, 1.5);
    let dy = normal(&mut r, &[3, 7, 5], 0.0, 1.0);
    let mut ran = 0;
    for adapter in adapters
        .iter()
        .filter(|a| a.features().contains(wgpu::Features::SHADER_F16))
    {
        let name = adapter.get_info().name;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("app device without f16"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("{name}: request_device: {e}"));
        let app = GpuContext::from_device(&device, &queue).unwrap();
        assert!(!has_shader_f16(&app));
        let own = GpuContext::from_adapter(adapter).unwrap();
        let run = |ctx: &GpuContext| {
            let mut bn = layer(ctx, &config, &state, false);
            let out = run_all(&mut bn, &x, &dy);
            (out, bn)
        };
        let ((got, bn), (want, own_bn)) = (run(&app), run(&own));
        assert_kernels(&bn, "_f16_packed", &name);
        assert_kernels(&own_bn, "_f16", &name);
        for ((k, g), (_, w)) in got.tensors.iter().zip(&want.tensors) {
            let tol = if is_big(k) { TOL_F16 } else { TOL };
            all_close(k, g, w, tol, tol).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        ran += 1;
    }
    if std::env::var("BNORM_EXPECT_F16").is_ok_and(|v| !v.is_empty()) {
        assert!(
            ran > 0,
            "no adapter with SHADER_F16 opened a device without it"
        );
    }
}

#[test]
fn mixed_dtypes_are_refused() {
    for ctx in gpu_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        let mut r = rng(7);
        let x = normal(&mut r, &[2, 3, 4], 0.0, 1.0);
        let x16 =
            GpuTensor::from_array_as(ctx, x.view(), Layout::ChannelsFirst, DType::F16).unwrap();
        let x32 = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        let fwd = bn.run_forward_train(&x16).unwrap();
        let y = fwd.y;
        assert_eq!(y.dtype(), DType::F16);
        let e = bn.run_backward(&x16, &x32, &fwd.saved).unwrap_err();
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
        assert!(e.to_string().contains("dy is f32, expected f16"), "{e}");
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let e = bn
            .record_forward_train(&mut enc, &x32, &y, None)
            .unwrap_err();
        assert!(e.to_string().contains("y is f16, expected f32"), "{e}");
        assert_eq!(bn.num_batches_tracked().unwrap(), Some(1));
        let h = y.to_vec_f16().unwrap();
        assert_eq!(h.len(), 24);
        assert!(x32.to_vec_f16().is_err());
    }
}

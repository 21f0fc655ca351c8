//! The GPU layer inside an app's own wgpu program: the app's device, its
//! buffers at offsets, its command encoders and submissions, its kernels and
//! its threads. Every test runs on every adapter of `gpu_contexts()`.

mod common;
use common::*;
use ndarray::ArrayD;
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use wgpu::util::DeviceExt;
use wgpu_batchnorm::{
    AdapterSelection, BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference, DType,
    Error, GpuBatchNorm, GpuContext, GpuSavedStats, GpuTensor, Layout, Mode, SavedStats,
};

/// The system allocator, recording the largest single request (for the
/// test that huge inputs are refused before anything is copied).
struct Counting;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Every adapter; none is a failure when a GPU is required.
fn contexts() -> &'static [GpuContext] {
    let c = gpu_contexts();
    assert!(
        !c.is_empty() || !gpu_required(),
        "a GPU adapter is required (CI or BNORM_REQUIRE_GPU) but none was found"
    );
    c
}

/// Runs `body` on every adapter, all of them even when one fails (each
/// failure's message is printed as it happens), and fails naming the
/// adapters that did.
fn on_every_adapter(body: impl Fn(&GpuContext)) {
    let mut failed = Vec::new();
    for ctx in contexts() {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(ctx))).is_err() {
            failed.push(ctx.label());
        }
    }
    assert!(failed.is_empty(), "failed on {failed:?} (messages above)");
}

/// What the CPU reference computes for one training step: a forward of `x`
/// and the backward of `dy` through it.
struct Reference {
    y: Vec<f32>,
    saved: SavedStats,
    dx: Vec<f32>,
    dweight: Vec<f32>,
    dbias: Vec<f32>,
    state: BatchNormState,
}

fn reference(
    config: &BatchNormConfig,
    state: &BatchNormState,
    x: &ArrayD<f32>,
    dy: &ArrayD<f32>,
) -> Reference {
    let mut r = CpuReference::new(config.clone()).unwrap();
    r.set_state(state).unwrap();
    let y = flat(&r.forward_train(x.view()).unwrap());
    let saved = r.saved_stats().unwrap().expect("saved after forward_train");
    let g = r.backward(x.view(), dy.view(), Mode::Train).unwrap();
    Reference {
        y,
        saved,
        dx: flat(&g.dx),
        dweight: g.dweight.unwrap_or_default(),
        dbias: g.dbias.unwrap_or_default(),
        state: r.state().unwrap(),
    }
}

/// Panics unless `got` is within the f32 tolerance of `want`.
fn close(on: &str, what: &str, got: &[f32], want: &[f32]) {
    if let Err(e) = all_close(what, got, want, TOL, TOL) {
        panic!("{on}: {e}");
    }
}

/// Panics unless `got` and `want` are the same bits.
fn same_bits(on: &str, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{on}: {what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        let bad = (0..got.len())
            .filter(|&i| got[i].to_bits() != want[i].to_bits())
            .count();
        panic!(
            "{on}: {what}: {bad} of {} elements differ bitwise; first at {i}: {} vs {}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Running statistics, parameters and num_batches_tracked, bitwise.
fn same_state(on: &str, got: &BatchNormState, want: &BatchNormState) {
    let pairs = [
        ("weight", &got.weight, &want.weight),
        ("bias", &got.bias, &want.bias),
        ("running_mean", &got.running_mean, &want.running_mean),
        ("running_var", &got.running_var, &want.running_var),
    ];
    for (what, g, w) in pairs {
        assert_eq!(g.is_some(), w.is_some(), "{on}: {what}");
        if let (Some(g), Some(w)) = (g, w) {
            same_bits(on, what, g, w);
        }
    }
    assert_eq!(
        got.num_batches_tracked, want.num_batches_tracked,
        "{on}: num_batches_tracked"
    );
}

/// Running statistics and num_batches_tracked within the f32 tolerance.
fn close_state(on: &str, got: &BatchNormState, want: &BatchNormState) {
    for (what, g, w) in [
        ("weight", &got.weight, &want.weight),
        ("bias", &got.bias, &want.bias),
        ("running_mean", &got.running_mean, &want.running_mean),
        ("running_var", &got.running_var, &want.running_var),
    ] {
        assert_eq!(g.is_some(), w.is_some(), "{on}: {what}");
        if let (Some(g), Some(w)) = (g, w) {
            close(on, what, g, w);
        }
    }
    assert_eq!(
        got.num_batches_tracked, want.num_batches_tracked,
        "{on}: num_batches_tracked"
    );
}

fn upload(ctx: &GpuContext, a: &ArrayD<f32>, layout: Layout) -> GpuTensor {
    GpuTensor::from_array(ctx, a.view(), layout).unwrap()
}

/// An uninitialized output filled with NaN, so an unwritten element shows.
fn poisoned(ctx: &GpuContext, dims: &[usize], layout: Layout) -> GpuTensor {
    let t = GpuTensor::uninit(ctx, dims, layout).unwrap();
    t.write(&vec![f32::NAN; t.len()]).unwrap();
    t
}

fn read(t: &GpuTensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

/// Submits the app's encoder alone and waits for the device.
fn submit(ctx: &GpuContext, enc: wgpu::CommandEncoder) {
    ctx.queue().submit([enc.finish()]);
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
}

fn encoder(ctx: &GpuContext, label: &str) -> wgpu::CommandEncoder {
    ctx.device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
}

const APP_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// An app buffer holding `data`.
fn app_buffer(ctx: &GpuContext, label: &str, data: &[f32]) -> wgpu::Buffer {
    ctx.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(data),
            usage: APP_USAGE,
        })
}

/// An f32 view of `buffer` from float `at` (a byte offset of `4 * at`).
fn view_at(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    at: usize,
    dims: &[usize],
    layout: Layout,
) -> GpuTensor {
    GpuTensor::from_buffer(ctx, buffer, (at * 4) as u64, dims, layout, DType::F32).unwrap()
}

/// The whole of an app buffer of f32.
fn read_buffer(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Vec<f32> {
    let len = (buffer.size() / 4) as usize;
    read(&view_at(ctx, buffer, 0, &[len], Layout::ChannelsFirst))
}

/// `min_storage_buffer_offset_alignment` in floats.
fn align_floats(ctx: &GpuContext) -> usize {
    (ctx.limits().min_storage_buffer_offset_alignment as usize / 4).max(1)
}

/// The adapter `ctx` was opened on, enumerated afresh as an app would.
fn adapter_of(ctx: &GpuContext) -> wgpu::Adapter {
    wgpu_batchnorm::gpu::enumerate_adapters(&AdapterSelection::from_env())
        .into_iter()
        .find(|a| {
            let info = a.get_info();
            info.name == ctx.name() && info.backend == ctx.adapter_info().backend
        })
        .unwrap_or_else(|| panic!("{}: adapter not enumerated again", ctx.label()))
}

/// A device on `adapter` with `limits` and the optional features it has, as an app opens one.
fn app_device(adapter: &wgpu::Adapter, limits: wgpu::Limits) -> (wgpu::Device, wgpu::Queue) {
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("app device"),
        required_features: adapter.features() & GpuContext::optional_features(),
        required_limits: limits,
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("{}: request_device: {e}", adapter.get_info().name))
}

/// Data of one layer's training step: configuration, state, input, gradient.
struct Case {
    config: BatchNormConfig,
    state: BatchNormState,
    x: ArrayD<f32>,
    dy: ArrayD<f32>,
}

fn case(config: BatchNormConfig, dims: &[usize], seed: u64) -> Case {
    let mut r = rng(seed);
    let state = random_state(&mut r, &config, 3);
    let x = normal(&mut r, dims, 0.7, 1.3);
    let dy = normal(&mut r, dims, 0.1, 1.0);
    Case {
        config,
        state,
        x,
        dy,
    }
}

fn layer(ctx: &GpuContext, c: &Case) -> GpuBatchNorm {
    let mut bn = GpuBatchNorm::new(ctx, c.config.clone()).unwrap();
    bn.set_state(&c.state).unwrap();
    bn
}

#[test]
fn from_device_runs_batchnorm_on_the_apps_device_like_the_reference() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let adapter = adapter_of(ctx);
        // what the crate needs, no more than the adapter has
        let limits = GpuContext::required_limits().or_worse_values_from(&adapter.limits());
        let (device, queue) = app_device(&adapter, limits.clone());
        let app = GpuContext::from_device(&device, &queue)
            .unwrap_or_else(|e| panic!("{on}: from_device: {e}"));
        assert!(app.device() == &device, "{on}: not the app's device");
        assert_eq!(app.limits(), &device.limits(), "{on}");
        assert_eq!(app.adapter_info().backend, ctx.adapter_info().backend);

        let c = case(BatchNormConfig::new(5), &[4, 5, 3, 7], 11);
        let want = reference(&c.config, &c.state, &c.x, &c.dy);

        // the ndarray interface
        let mut bn = layer(&app, &c);
        let y = BatchNormBackend::forward_train(&mut bn, c.x.view()).unwrap_or_else(|e| {
            panic!("{on}: a training forward on a device made with these limits: {e}\n{limits:?}")
        });
        close(&on, "y", &flat(&y), &want.y);
        let g = BatchNormBackend::backward(&mut bn, c.x.view(), c.dy.view(), Mode::Train).unwrap();
        close(&on, "dx", &flat(&g.dx), &want.dx);
        close(&on, "dweight", &g.dweight.unwrap(), &want.dweight);
        close(&on, "dbias", &g.dbias.unwrap(), &want.dbias);
        close_state(&on, &bn.state().unwrap(), &want.state);

        // recorded into the app's encoder, submitted on the app's queue
        let mut bn = layer(&app, &c);
        let x = upload(&app, &c.x, Layout::ChannelsFirst);
        let dy = upload(&app, &c.dy, Layout::ChannelsFirst);
        let y = poisoned(&app, c.x.shape(), Layout::ChannelsFirst);
        let dx = poisoned(&app, c.x.shape(), Layout::ChannelsFirst);
        let mut saved = GpuSavedStats::new(&bn).unwrap();
        let mut enc = device.create_command_encoder(&Default::default());
        bn.record_forward_train(&mut enc, &x, &y, Some(&mut saved))
            .unwrap();
        bn.record_backward(&mut enc, &x, &dy, &saved, &dx).unwrap();
        queue.submit([enc.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        close(&on, "recorded y", &read(&y), &want.y);
        close(&on, "recorded dx", &read(&dx), &want.dx);
        close(&on, "dweight", &read(bn.dweight().unwrap()), &want.dweight);
        close(&on, "dbias", &read(bn.dbias().unwrap()), &want.dbias);
        let s = saved.read().unwrap().unwrap();
        close(&on, "save_mean", &s.mean, &want.saved.mean);
        close(&on, "save_invstd", &s.invstd, &want.saved.invstd);
        close_state(&on, &bn.state().unwrap(), &want.state);
    });
}

#[test]
fn from_device_names_each_limit_the_device_was_created_below() {
    let need = GpuContext::required_limits();
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let adapter = adapter_of(ctx);
        let has = adapter.limits();

        // WebGL2's limits: no compute at all
        let (device, queue) = app_device(
            &adapter,
            wgpu::Limits::downlevel_webgl2_defaults().or_worse_values_from(&has),
        );
        let e = GpuContext::from_device(&device, &queue).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{on}: {e:?}");
        let msg = e.to_string();
        for needle in [
            "max_compute_invocations_per_workgroup is 0".to_string(),
            format!(
                "needs at least {}",
                need.max_compute_invocations_per_workgroup
            ),
            "max_compute_workgroup_storage_size is 0".to_string(),
            "max_storage_buffers_per_shader_stage is 0".to_string(),
            "required_limits".to_string(),
        ] {
            assert!(msg.contains(&needle), "{on}: {msg:?} lacks {needle:?}");
        }

        // one limit short, the others enough: only that one is named
        let (device, queue) = app_device(
            &adapter,
            wgpu::Limits {
                max_storage_buffers_per_shader_stage: 2,
                ..need.clone().or_worse_values_from(&has)
            },
        );
        let e = GpuContext::from_device(&device, &queue).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{on}: {e:?}");
        let msg = e.to_string();
        let needle = format!(
            "max_storage_buffers_per_shader_stage is 2, needs at least {}",
            need.max_storage_buffers_per_shader_stage
        );
        assert!(msg.contains(&needle), "{on}: {msg:?} lacks {needle:?}");
        assert!(!msg.contains("max_compute"), "{on}: {msg:?}");
    });
}

#[test]
fn views_at_offsets_of_app_buffers_write_only_their_own_bytes() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let a = align_floats(ctx);
        // odd length (scalar kernels) and a multiple of 4 (vec4 kernels)
        for (seed, dims) in [(21, vec![3, 4, 37]), (22, vec![2, 4, 6, 8])] {
            let c = case(BatchNormConfig::new(4), &dims, seed);
            let n = c.x.len();
            let mut r = rng(seed + 100);
            // inputs: [other data | x | other data | dy | other data]
            let x_at = 3 * a;
            let dy_at = (x_at + n).next_multiple_of(a) + a;
            let mut inputs = flat(&normal(&mut r, &[dy_at + n + 7], -3.0, 2.0));
            inputs[x_at..x_at + n].copy_from_slice(&flat(&c.x));
            inputs[dy_at..dy_at + n].copy_from_slice(&flat(&c.dy));
            // outputs: [other data | y | other data | dx | other data], the views poisoned
            let y_at = a;
            let dx_at = (y_at + n).next_multiple_of(a) + 2 * a;
            let outputs = flat(&normal(&mut r, &[dx_at + n + 5], 1000.0, 5.0));
            let in_buf = app_buffer(ctx, "app inputs", &inputs);
            let out_buf = app_buffer(ctx, "app outputs", &outputs);
            let lay = Layout::ChannelsFirst;
            let x = view_at(ctx, &in_buf, x_at, &dims, lay);
            let dy = view_at(ctx, &in_buf, dy_at, &dims, lay);
            let y = view_at(ctx, &out_buf, y_at, &dims, lay);
            let dx = view_at(ctx, &out_buf, dx_at, &dims, lay);
            assert_eq!(x.offset(), (x_at * 4) as u64);
            assert!(x.offset() > 0 && y.offset() > 0);

            let mut bn = layer(ctx, &c);
            let mut saved = GpuSavedStats::new(&bn).unwrap();
            let mut enc = encoder(ctx, "app step");
            bn.record_forward_train(&mut enc, &x, &y, Some(&mut saved))
                .unwrap();
            bn.record_backward(&mut enc, &x, &dy, &saved, &dx).unwrap();
            submit(ctx, enc);

            let want = reference(&c.config, &c.state, &c.x, &c.dy);
            let on = format!("{on} {dims:?}");
            same_bits(&on, "input buffer", &read_buffer(ctx, &in_buf), &inputs);
            let got = read_buffer(ctx, &out_buf);
            close(&on, "y", &got[y_at..y_at + n], &want.y);
            close(&on, "dx", &got[dx_at..dx_at + n], &want.dx);
            let outside = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .enumerate()
                    .filter(|(i, _)| !(y_at..y_at + n).contains(i))
                    .filter(|(i, _)| !(dx_at..dx_at + n).contains(i))
                    .map(|(_, &v)| v)
                    .collect()
            };
            same_bits(
                &on,
                "output buffer outside the views",
                &outside(&got),
                &outside(&outputs),
            );
            close(&on, "dweight", &read(bn.dweight().unwrap()), &want.dweight);
            close_state(&on, &bn.state().unwrap(), &want.state);
        }
    });
}

#[test]
fn an_output_sharing_a_buffer_with_an_input_is_refused() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let a = align_floats(ctx);
        let dims = [2, 3, 10];
        let c = case(BatchNormConfig::new(3), &dims, 31);
        let n = c.x.len();
        let mut r = rng(32);
        let far = (n + a).next_multiple_of(a);
        let mut inputs = flat(&normal(&mut r, &[3 * far], 0.0, 1.0));
        inputs[..n].copy_from_slice(&flat(&c.x));
        inputs[far..far + n].copy_from_slice(&flat(&c.dy));
        let in_buf = app_buffer(ctx, "inputs", &inputs);
        let out_buf = app_buffer(ctx, "outputs", &flat(&normal(&mut r, &[3 * far], 9.0, 1.0)));
        let lay = Layout::ChannelsFirst;
        let x = view_at(ctx, &in_buf, 0, &dims, lay);
        let dy = view_at(ctx, &in_buf, far, &dims, lay);
        let y_beside_x = view_at(ctx, &in_buf, 2 * far, &dims, lay);
        let dy_out = view_at(ctx, &out_buf, 0, &dims, lay);
        let dx_beside_dy = view_at(ctx, &out_buf, far, &dims, lay);
        let dx_beside_x = view_at(ctx, &in_buf, 2 * far, &dims, lay);

        let mut bn = layer(ctx, &c);
        let mut saved = GpuSavedStats::new(&bn).unwrap();
        let y = poisoned(ctx, &dims, lay);
        ctx.run("forward", |enc| {
            bn.record_forward_train(enc, &x, &y, Some(&mut saved))
        })
        .unwrap();
        let before = bn.state().unwrap();

        let mut enc = encoder(ctx, "refused");
        let is_alias = |e: &Error, what: &str, other: &str| {
            matches!(e, Error::BufferAlias { .. })
                && e.to_string()
                    .starts_with(&format!("{what} and {other} are views of the same buffer"))
        };
        let e = bn
            .record_forward_train(&mut enc, &x, &y_beside_x, None)
            .unwrap_err();
        assert!(is_alias(&e, "y", "x"), "{on}: {e:?}");
        let e = bn
            .record_forward_eval(&mut enc, &x, &y_beside_x, None)
            .unwrap_err();
        assert!(is_alias(&e, "y", "x"), "{on}: {e:?}");
        let e = bn
            .record_backward(&mut enc, &x, &dy_out, &saved, &dx_beside_dy)
            .unwrap_err();
        assert!(is_alias(&e, "dx", "dy"), "{on}: {e:?}");
        let e = bn
            .record_backward(&mut enc, &x, &dy, &saved, &dx_beside_x)
            .unwrap_err();
        assert!(is_alias(&e, "dx", "x"), "{on}: {e:?}");
        // the encoder is still usable, and nothing was recorded
        let dx = poisoned(ctx, &dims, lay);
        bn.record_backward(&mut enc, &x, &dy, &saved, &dx).unwrap();
        submit(ctx, enc);
        let want = reference(&c.config, &c.state, &c.x, &c.dy);
        close(&on, "dx", &read(&dx), &want.dx);
        same_state(&on, &bn.state().unwrap(), &before);
        same_bits(&on, "inputs", &read_buffer(ctx, &in_buf), &inputs);
    });
}

#[test]
fn from_buffer_checks_usage_alignment_and_size() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment).max(4);
        let dims = [2, 3, 50];
        let bytes = 2 * 3 * 50 * 4;
        let lay = Layout::ChannelsFirst;
        let buffer = |usage: wgpu::BufferUsages, size: u64| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("app buffer"),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let from = |b: &wgpu::Buffer, offset: u64, dims: &[usize]| {
            GpuTensor::from_buffer(ctx, b, offset, dims, lay, DType::F32)
        };
        let has = |e: &Error, needle: &str| e.to_string().contains(needle);

        // not a storage buffer
        let copy_only = buffer(
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            4096,
        );
        let e = from(&copy_only, 0, &dims).unwrap_err();
        assert!(matches!(e, Error::BufferUsage { .. }), "{on}: {e:?}");
        assert!(has(&e, "lacks BufferUsages(STORAGE)"), "{on}: {e}");

        // exactly big enough at offset 2 * align
        let exact = buffer(APP_USAGE, 2 * align + bytes);
        let t = from(&exact, 2 * align, &dims).unwrap();
        assert_eq!((t.offset(), t.bytes()), (2 * align, bytes));
        let e = from(&exact, 2, &dims).unwrap_err();
        assert!(
            matches!(e, Error::Misaligned { offset: 2, .. }),
            "{on}: {e:?}"
        );
        assert!(has(&e, "min_storage_buffer_offset_alignment"), "{on}: {e}");
        if align > 4 {
            // a multiple of 4 that is not one of the device's alignment
            let e = from(&exact, align + 4, &dims).unwrap_err();
            assert!(matches!(e, Error::Misaligned { .. }), "{on}: {e:?}");
        }
        // one alignment further, or one element longer: too small
        let e = from(&exact, 3 * align, &dims).unwrap_err();
        assert!(
            matches!(e, Error::BufferTooSmall { size, .. } if size == 2 * align + bytes),
            "{on}: {e:?}"
        );
        let e = from(&exact, 2 * align, &[2, 3, 51]).unwrap_err();
        assert!(matches!(e, Error::BufferTooSmall { .. }), "{on}: {e:?}");
        assert!(
            has(&e, &format!("which has {} bytes", 2 * align + bytes)),
            "{on}: {e}"
        );

        // a storage buffer without COPY_SRC is a fine view but cannot be read back
        let unreadable = buffer(
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            bytes,
        );
        let t = from(&unreadable, 0, &dims).unwrap();
        let e = t.to_vec().unwrap_err();
        assert!(matches!(e, Error::BufferUsage { .. }), "{on}: {e:?}");
        assert!(has(&e, "COPY_SRC"), "{on}: {e}");
        assert!(matches!(t.to_array(), Err(Error::BufferUsage { .. })));
        assert!(matches!(
            t.read_async().map(drop),
            Err(Error::BufferUsage { .. })
        ));
        // ... and one without COPY_DST cannot be written from the host
        let unwritable = buffer(
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            bytes,
        );
        let t = from(&unwritable, 0, &dims).unwrap();
        let e = t.write(&vec![1.0; 300]).unwrap_err();
        assert!(matches!(e, Error::BufferUsage { .. }), "{on}: {e:?}");
        assert!(has(&e, "COPY_DST"), "{on}: {e}");
    });
}

#[test]
fn many_layers_recorded_into_one_submission_match_separate_runs() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let cases = [
            case(BatchNormConfig::new(3), &[4, 3, 20], 41),
            case(BatchNormConfig::new(6), &[2, 6, 5, 4], 42),
            case(
                BatchNormConfig::new(8).with_layout(Layout::ChannelsLast),
                &[2, 3, 5, 8],
                43,
            ),
        ];
        let mut layers: Vec<GpuBatchNorm> = cases.iter().map(|c| layer(ctx, c)).collect();
        let mut twins: Vec<GpuBatchNorm> = cases.iter().map(|c| layer(ctx, c)).collect();
        // the small slices of the second layer cut its channels into several workgroups
        layers[1].set_slice_len(Some(7)).unwrap();
        twins[1].set_slice_len(Some(7)).unwrap();
        struct Io {
            x: GpuTensor,
            dy: GpuTensor,
            y: GpuTensor,
            dx: GpuTensor,
            saved: GpuSavedStats,
        }
        let mut io: Vec<Io> = cases
            .iter()
            .zip(&layers)
            .map(|(c, bn)| {
                let lay = c.config.layout;
                Io {
                    x: upload(ctx, &c.x, lay),
                    dy: upload(ctx, &c.dy, lay),
                    y: poisoned(ctx, c.x.shape(), lay),
                    dx: poisoned(ctx, c.x.shape(), lay),
                    saved: GpuSavedStats::new(bn).unwrap(),
                }
            })
            .collect();

        // forwards in order, backwards in reverse, one encoder, one submit
        let mut enc = encoder(ctx, "three layers");
        for (bn, t) in layers.iter_mut().zip(io.iter_mut()) {
            bn.record_forward_train(&mut enc, &t.x, &t.y, Some(&mut t.saved))
                .unwrap();
        }
        for (bn, t) in layers.iter_mut().zip(&io).rev() {
            bn.record_backward(&mut enc, &t.x, &t.dy, &t.saved, &t.dx)
                .unwrap();
        }
        submit(ctx, enc);

        let fwds: Vec<_> = twins
            .iter_mut()
            .zip(&io)
            .map(|(bn, t)| bn.run_forward_train(&t.x).unwrap())
            .collect();
        let mut grads: Vec<_> = twins
            .iter_mut()
            .zip(&io)
            .zip(&fwds)
            .rev()
            .map(|((bn, t), f)| bn.run_backward(&t.x, &t.dy, &f.saved).unwrap())
            .collect();
        grads.reverse();

        for (i, c) in cases.iter().enumerate() {
            let on = format!("{on} layer {i}");
            let (bn, twin, t) = (&layers[i], &twins[i], &io[i]);
            same_bits(&on, "y", &read(&t.y), &read(&fwds[i].y));
            same_bits(&on, "dx", &read(&t.dx), &read(&grads[i].dx));
            let (s, w) = (
                t.saved.read().unwrap().unwrap(),
                fwds[i].saved.read().unwrap().unwrap(),
            );
            same_bits(&on, "save_mean", &s.mean, &w.mean);
            same_bits(&on, "save_invstd", &s.invstd, &w.invstd);
            let dw = read(bn.dweight().unwrap());
            same_bits(
                &on,
                "dweight",
                &dw,
                &read(grads[i].dweight.as_ref().unwrap()),
            );
            let db = read(bn.dbias().unwrap());
            same_bits(&on, "dbias", &db, &read(grads[i].dbias.as_ref().unwrap()));
            let state = bn.state().unwrap();
            same_state(&on, &state, &twin.state().unwrap());
            assert_eq!(state.num_batches_tracked, Some(4), "{on}");
            // and both are right
            let want = reference(&c.config, &c.state, &c.x, &c.dy);
            close(&on, "y", &read(&t.y), &want.y);
            close(&on, "dx", &read(&t.dx), &want.dx);
            close(&on, "dweight", &dw, &want.dweight);
            close(&on, "dbias", &db, &want.dbias);
            close_state(&on, &state, &want.state);
        }
    });
}

/// Everything two micro-batches produce, read back.
#[derive(Debug)]
struct TwoBatches {
    y: [Vec<f32>; 2],
    dx: [Vec<f32>; 2],
    dweight: [Vec<f32>; 2],
    dbias: [Vec<f32>; 2],
    saved: [SavedStats; 2],
    state: BatchNormState,
}

fn same_layer_twice_in_one_encoder(config: BatchNormConfig, seed: u64) {
    let c = 4;
    // two micro-batches of different sizes
    let a = case(config.clone(), &[3, c, 11], seed);
    let b = case(config, &[5, c, 11], seed + 1);
    on_every_adapter(|ctx| {
        let on = format!("{} momentum {:?}", ctx.label(), a.config.momentum);
        let lay = Layout::ChannelsFirst;
        let (xa, dya) = (upload(ctx, &a.x, lay), upload(ctx, &a.dy, lay));
        let (xb, dyb) = (upload(ctx, &b.x, lay), upload(ctx, &b.dy, lay));

        // recorded: forward a, forward b, backward a, backward b, one submit
        let mut bn = layer(ctx, &a);
        let (ya, yb) = (
            poisoned(ctx, a.x.shape(), lay),
            poisoned(ctx, b.x.shape(), lay),
        );
        let (dxa, dxb) = (
            poisoned(ctx, a.x.shape(), lay),
            poisoned(ctx, b.x.shape(), lay),
        );
        // the app's buffer for the four gradients: dweight a, dbias a, dweight b, dbias b
        let kept = app_buffer(ctx, "app gradients", &vec![f32::NAN; 4 * c]);
        let (mut sa, mut sb) = (
            GpuSavedStats::new(&bn).unwrap(),
            GpuSavedStats::new(&bn).unwrap(),
        );
        // copies the layer's gradients to slots `first` and `first + 1` of `kept`
        let keep = |enc: &mut wgpu::CommandEncoder, bn: &GpuBatchNorm, first: usize| {
            for (slot, src) in [bn.dweight().unwrap(), bn.dbias().unwrap()]
                .into_iter()
                .enumerate()
            {
                let at = ((first + slot) * c * 4) as u64;
                enc.copy_buffer_to_buffer(src.buffer(), src.offset(), &kept, at, src.bytes());
            }
        };
        let mut enc = encoder(ctx, "two micro-batches");
        bn.record_forward_train(&mut enc, &xa, &ya, Some(&mut sa))
            .unwrap();
        bn.record_forward_train(&mut enc, &xb, &yb, Some(&mut sb))
            .unwrap();
        bn.record_backward(&mut enc, &xa, &dya, &sa, &dxa).unwrap();
        keep(&mut enc, &bn, 0);
        bn.record_backward(&mut enc, &xb, &dyb, &sb, &dxb).unwrap();
        keep(&mut enc, &bn, 2);
        submit(ctx, enc);
        let g = read_buffer(ctx, &kept);
        let slot = |i: usize| g[i * c..(i + 1) * c].to_vec();
        let got = TwoBatches {
            y: [read(&ya), read(&yb)],
            dx: [read(&dxa), read(&dxb)],
            dweight: [slot(0), slot(2)],
            dbias: [slot(1), slot(3)],
            saved: [sa.read().unwrap().unwrap(), sb.read().unwrap().unwrap()],
            state: bn.state().unwrap(),
        };

        // the same calls one by one on a twin
        let mut twin = layer(ctx, &a);
        let fa = twin.run_forward_train(&xa).unwrap();
        let fb = twin.run_forward_train(&xb).unwrap();
        let ga = twin.run_backward(&xa, &dya, &fa.saved).unwrap();
        let gb = twin.run_backward(&xb, &dyb, &fb.saved).unwrap();
        let want = TwoBatches {
            y: [read(&fa.y), read(&fb.y)],
            dx: [read(&ga.dx), read(&gb.dx)],
            dweight: [
                read(ga.dweight.as_ref().unwrap()),
                read(gb.dweight.as_ref().unwrap()),
            ],
            dbias: [
                read(ga.dbias.as_ref().unwrap()),
                read(gb.dbias.as_ref().unwrap()),
            ],
            saved: [
                fa.saved.read().unwrap().unwrap(),
                fb.saved.read().unwrap().unwrap(),
            ],
            state: twin.state().unwrap(),
        };

        for i in 0..2 {
            let on = format!("{on} micro-batch {}", ["a", "b"][i]);
            same_bits(&on, "y", &got.y[i], &want.y[i]);
            same_bits(&on, "dx", &got.dx[i], &want.dx[i]);
            same_bits(&on, "dweight", &got.dweight[i], &want.dweight[i]);
            same_bits(&on, "dbias", &got.dbias[i], &want.dbias[i]);
            same_bits(&on, "save_mean", &got.saved[i].mean, &want.saved[i].mean);
            same_bits(
                &on,
                "save_invstd",
                &got.saved[i].invstd,
                &want.saved[i].invstd,
            );
        }
        same_state(&on, &got.state, &want.state);
        assert_eq!(got.state.num_batches_tracked, Some(5), "{on}");
        assert_eq!(bn.num_batches_tracked().unwrap(), Some(5), "{on}");

        // and right: the reference, step by step
        let mut r = CpuReference::new(a.config.clone()).unwrap();
        r.set_state(&a.state).unwrap();
        for (i, m) in [&a, &b].into_iter().enumerate() {
            let on = format!("{on} micro-batch {}", ["a", "b"][i]);
            close(
                &on,
                "y",
                &got.y[i],
                &flat(&r.forward_train(m.x.view()).unwrap()),
            );
            let g = r.backward(m.x.view(), m.dy.view(), Mode::Train).unwrap();
            close(&on, "dx", &got.dx[i], &flat(&g.dx));
            close(&on, "dweight", &got.dweight[i], &g.dweight.unwrap());
            close(&on, "dbias", &got.dbias[i], &g.dbias.unwrap());
        }
        close_state(&on, &got.state, &r.state().unwrap());
    });
}

#[test]
fn one_layer_recorded_twice_in_one_encoder_matches_separate_runs_bitwise() {
    same_layer_twice_in_one_encoder(BatchNormConfig::new(4), 51);
    // cumulative moving average: each step's factor depends on the steps before it
    same_layer_twice_in_one_encoder(BatchNormConfig::new(4).with_momentum(None), 53);
}

#[test]
fn backward_takes_the_statistics_of_its_own_forward_and_refuses_others() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let lay = Layout::ChannelsFirst;
        let dims = [3, 4, 10];
        let a = case(BatchNormConfig::new(4), &dims, 61);
        let mut r = rng(62);
        let xb = normal(&mut r, &dims, -2.0, 0.5); // other statistics than a
        let xc = normal(&mut r, &[2, 4, 10], 1.0, 1.0);
        let mut bn = layer(ctx, &a);
        let mut other = layer(ctx, &a);
        let (x, dy) = (upload(ctx, &a.x, lay), upload(ctx, &a.dy, lay));
        let gxb = upload(ctx, &xb, lay);
        let gxc = upload(ctx, &xc, lay);
        let (y, yb, yc) = (
            poisoned(ctx, &dims, lay),
            poisoned(ctx, &dims, lay),
            poisoned(ctx, xc.shape(), lay),
        );
        let dx = poisoned(ctx, &dims, lay);
        let mut sa = GpuSavedStats::new(&bn).unwrap();
        let mut sb = GpuSavedStats::new(&bn).unwrap();
        let mut sc = GpuSavedStats::new(&bn).unwrap();
        let mut s_other = GpuSavedStats::new(&other).unwrap();
        let fresh = GpuSavedStats::new(&bn).unwrap();
        assert_eq!(fresh.dims(), None);
        assert!(fresh.read().unwrap().is_none());

        // forward a, forward b (same shape), backward of a
        ctx.run("a, b, backward a", |enc| {
            bn.record_forward_train(enc, &x, &y, Some(&mut sa))?;
            bn.record_forward_train(enc, &gxb, &yb, Some(&mut sb))?;
            bn.record_backward(enc, &x, &dy, &sa, &dx)
        })
        .unwrap();
        let want = reference(&a.config, &a.state, &a.x, &a.dy);
        close(&on, "y", &read(&y), &want.y);
        close(&on, "dx of a", &read(&dx), &want.dx);
        close(
            &on,
            "dweight of a",
            &read(bn.dweight().unwrap()),
            &want.dweight,
        );
        close(&on, "dbias of a", &read(bn.dbias().unwrap()), &want.dbias);
        let saved_a = sa.read().unwrap().unwrap();
        close(&on, "save_mean of a", &saved_a.mean, &want.saved.mean);
        close(&on, "save_invstd of a", &saved_a.invstd, &want.saved.invstd);
        assert_eq!(sa.dims(), Some(&dims[..]));
        // b's statistics are b's
        let mut rb = CpuReference::new(a.config.clone()).unwrap();
        rb.forward_train(xb.view()).unwrap();
        let want_b = rb.saved_stats().unwrap().unwrap();
        close(
            &on,
            "save_mean of b",
            &sb.read().unwrap().unwrap().mean,
            &want_b.mean,
        );

        // a forward of another layer, and one of this layer on another shape
        ctx.run("other layer", |enc| {
            other.record_forward_train(enc, &x, &yb, Some(&mut s_other))
        })
        .unwrap();
        ctx.run("other shape", |enc| {
            bn.record_forward_train(enc, &gxc, &yc, Some(&mut sc))
        })
        .unwrap();

        let before = (
            bn.state().unwrap(),
            read(bn.dweight().unwrap()),
            read(bn.dbias().unwrap()),
            sa.read().unwrap(),
            s_other.read().unwrap(),
        );
        let mut enc = encoder(ctx, "refusals");
        let e = bn
            .record_backward(&mut enc, &x, &dy, &s_other, &dx)
            .unwrap_err();
        assert!(matches!(e, Error::SavedStatsMismatch { .. }), "{on}: {e:?}");
        assert!(e.to_string().contains("made for layer #"), "{on}: {e}");
        let e = bn.record_backward(&mut enc, &x, &dy, &sc, &dx).unwrap_err();
        assert!(matches!(e, Error::SavedStatsMismatch { .. }), "{on}: {e:?}");
        assert!(
            e.to_string()
                .contains("forward on shape [2, 4, 10], the backward's input has shape [3, 4, 10]"),
            "{on}: {e}"
        );
        let e = bn
            .record_backward(&mut enc, &x, &dy, &fresh, &dx)
            .unwrap_err();
        assert!(matches!(e, Error::NoSavedStatistics { .. }), "{on}: {e:?}");
        // a forward into another layer's handle, and one that fails after its handle was named
        let e = bn
            .record_forward_train(&mut enc, &x, &y, Some(&mut s_other))
            .unwrap_err();
        assert!(matches!(e, Error::SavedStatsMismatch { .. }), "{on}: {e:?}");
        let e = bn
            .record_forward_train(&mut enc, &gxc, &y, Some(&mut sa))
            .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{on}: {e:?}");
        assert_eq!(
            sa.dims(),
            Some(&dims[..]),
            "{on}: a failed forward rewrote the handle"
        );
        assert_eq!(s_other.dims(), Some(&dims[..]), "{on}");

        // the encoder still records and runs; nothing refused ran
        let dx2 = poisoned(ctx, &dims, lay);
        bn.record_backward(&mut enc, &x, &dy, &sa, &dx2).unwrap();
        submit(ctx, enc);
        same_bits(&on, "dx of a again", &read(&dx2), &read(&dx));
        let after = (
            bn.state().unwrap(),
            read(bn.dweight().unwrap()),
            read(bn.dbias().unwrap()),
            sa.read().unwrap(),
            s_other.read().unwrap(),
        );
        same_state(&on, &after.0, &before.0);
        same_bits(&on, "dweight", &after.1, &before.1);
        same_bits(&on, "dbias", &after.2, &before.2);
        assert_eq!(after.3, before.3, "{on}: saved statistics of a");
        assert_eq!(
            after.4, before.4,
            "{on}: saved statistics of the other layer"
        );
        assert_eq!(after.0.num_batches_tracked, Some(6), "{on}");
    });
}

#[test]
fn recording_again_with_the_same_buffers_creates_no_resources() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let lay = Layout::ChannelsFirst;
        let dims = [4, 6, 9];
        let c = case(BatchNormConfig::new(6), &dims, 71);
        let mut bn = layer(ctx, &c);
        let (x, dy) = (upload(ctx, &c.x, lay), upload(ctx, &c.dy, lay));
        let (y, dx) = (poisoned(ctx, &dims, lay), poisoned(ctx, &dims, lay));
        let mut saved = GpuSavedStats::new(&bn).unwrap();
        let mut step = |bn: &mut GpuBatchNorm, y: &GpuTensor| {
            let mut enc = encoder(ctx, "step");
            bn.record_forward_train(&mut enc, &x, y, Some(&mut saved))
                .unwrap();
            bn.record_backward(&mut enc, &x, &dy, &saved, &dx).unwrap();
            submit(ctx, enc);
        };
        let made = bn.resource_counts();
        step(&mut bn, &y);
        let first = bn.resource_counts();
        assert!(
            first.bind_groups > made.bind_groups && first.buffers > made.buffers,
            "{on}: the first call made nothing? {made:?} -> {first:?}"
        );
        let mut r = rng(72);
        for i in 0..5 {
            // new values in the same buffers
            x.write(&flat(&normal(&mut r, &dims, 0.3, 2.0))).unwrap();
            dy.write(&flat(&normal(&mut r, &dims, 0.0, 1.0))).unwrap();
            step(&mut bn, &y);
            assert_eq!(bn.resource_counts(), first, "{on}: call {}", i + 2);
        }
        assert_eq!(bn.num_batches_tracked().unwrap(), Some(3 + 6));
        assert!(read(&dx).iter().all(|v| v.is_finite()), "{on}");
        // another output buffer is new to the layer: the counts do move
        let y2 = poisoned(ctx, &dims, lay);
        step(&mut bn, &y2);
        assert!(
            bn.resource_counts().bind_groups > first.bind_groups,
            "{on}: a new buffer made no bind group"
        );
    });
}

/// An app's SGD step in place, `param -= lr * grad`. The parameter and its
/// gradient are views of one buffer (the layer's state), so both are bound
/// read_write: wgpu refuses a buffer bound read-only and writable in one
/// dispatch.
const SGD_WGSL: &str = r"
struct Step { lr: f32, n: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i < step.n {
        param[i] = param[i] - step.lr * grad[i];
    }
}
";

#[test]
fn an_app_kernel_updates_weight_and_bias_in_place_from_the_gradients() {
    let lr = 0.25f32;
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let lay = Layout::ChannelsFirst;
        let channels = 5;
        let dims = [3, channels, 8];
        let c = case(BatchNormConfig::new(channels), &dims, 81);
        let x2 = normal(&mut rng(82), &dims, 2.0, 0.5);
        let device = ctx.device();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("app sgd"),
            source: wgpu::ShaderSource::Wgsl(SGD_WGSL.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("app sgd"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("app sgd step"),
            contents: bytemuck::cast_slice(&[lr.to_bits(), channels as u32, 0, 0]),
            usage: wgpu::BufferUsages::UNIFORM,
        });

        let mut bn = layer(ctx, &c);
        let bind = |param: &GpuTensor, grad: &GpuTensor| {
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("app sgd"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: params.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: wgpu::BindingResource::Buffer(param.binding()),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: wgpu::BindingResource::Buffer(grad.binding()),
                    },
                ],
            })
        };
        let groups = [
            bind(bn.weight().unwrap(), bn.dweight().unwrap()),
            bind(bn.bias().unwrap(), bn.dbias().unwrap()),
        ];
        let (x, dy) = (upload(ctx, &c.x, lay), upload(ctx, &c.dy, lay));
        let gx2 = upload(ctx, &x2, lay);
        let (y, dx, y2) = (
            poisoned(ctx, &dims, lay),
            poisoned(ctx, &dims, lay),
            poisoned(ctx, &dims, lay),
        );
        let (mut saved, mut saved2) = (
            GpuSavedStats::new(&bn).unwrap(),
            GpuSavedStats::new(&bn).unwrap(),
        );

        // forward, backward, the app's update, the next forward: one encoder
        let mut enc = encoder(ctx, "train step");
        bn.record_forward_train(&mut enc, &x, &y, Some(&mut saved))
            .unwrap();
        bn.record_backward(&mut enc, &x, &dy, &saved, &dx).unwrap();
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("app sgd"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            for g in &groups {
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
        bn.record_forward_train(&mut enc, &gx2, &y2, Some(&mut saved2))
            .unwrap();
        submit(ctx, enc);

        let want = reference(&c.config, &c.state, &c.x, &c.dy);
        let (dw, db) = (read(bn.dweight().unwrap()), read(bn.dbias().unwrap()));
        close(&on, "dweight", &dw, &want.dweight);
        close(&on, "dbias", &db, &want.dbias);
        let (w0, b0) = (
            c.state.weight.clone().unwrap(),
            c.state.bias.clone().unwrap(),
        );
        let sgd = |p: &[f32], g: &[f32]| -> Vec<f32> {
            p.iter().zip(g).map(|(&p, &g)| p - lr * g).collect()
        };
        let (w1, b1) = (sgd(&w0, &dw), sgd(&b0, &db));
        let state = bn.state().unwrap();
        let tight = |what: &str, got: &[f32], want: &[f32]| {
            if let Err(e) = all_close(what, got, want, 1e-6, 1e-6) {
                panic!("{on}: {e}");
            }
        };
        tight(
            "weight after the app's step",
            state.weight.as_ref().unwrap(),
            &w1,
        );
        tight(
            "bias after the app's step",
            state.bias.as_ref().unwrap(),
            &b1,
        );
        assert_ne!(w1, w0, "{on}: the step moved nothing");
        assert_eq!(read(bn.weight().unwrap()), state.weight.clone().unwrap());
        // the next forward normalized with the updated parameters
        let mut stepped = want.state.clone();
        stepped.weight = Some(w1);
        stepped.bias = Some(b1);
        let mut r = CpuReference::new(c.config.clone()).unwrap();
        r.set_state(&stepped).unwrap();
        close(
            &on,
            "y after the step",
            &read(&y2),
            &flat(&r.forward_train(x2.view()).unwrap()),
        );
        close_state(&on, &state, &r.state().unwrap());
    });
}

/// Polls `fut` once, without blocking.
fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn read_async_resolves_after_the_app_polls_the_device() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let lay = Layout::ChannelsFirst;
        let dims = [3, 4, 9];
        let c = case(BatchNormConfig::new(4), &dims, 91);
        let mut bn = layer(ctx, &c);
        let x = upload(ctx, &c.x, lay);
        let y = bn.run_forward_train(&x).unwrap().y;
        let want = reference(&c.config, &c.state, &c.x, &c.dy);

        // a view of an app buffer at an offset, among other data
        let a = align_floats(ctx);
        let mut r = rng(92);
        let mut data = flat(&normal(&mut r, &[4 * a + 50], 5.0, 1.0));
        let inner: Vec<f32> = data[2 * a..2 * a + 33].to_vec();
        data[2 * a + 33] = f32::NAN;
        let app = app_buffer(ctx, "app data", &data);
        let view = view_at(ctx, &app, 2 * a, &[3, 11], lay);

        // several reads in flight at once; one wait resolves them all
        let pending_y = y.read_async().unwrap();
        let pending_view = view.read_async().unwrap();
        let pending_x = x.read_async().unwrap();
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        let mut pending_y = std::pin::pin!(pending_y);
        let mut pending_view = std::pin::pin!(pending_view);
        let mut pending_x = std::pin::pin!(pending_x);
        let mut failures = Vec::new();
        let x_values = flat(&c.x);
        for (what, state, expected) in [
            ("y", poll_once(pending_y.as_mut()), &want.y),
            ("app view", poll_once(pending_view.as_mut()), &inner),
            ("x", poll_once(pending_x.as_mut()), &x_values),
        ] {
            match state {
                Poll::Ready(v) => {
                    let v = v.unwrap();
                    if what == "y" {
                        close(&on, what, &v, expected);
                    } else {
                        same_bits(&on, what, &v, expected);
                    }
                }
                Poll::Pending => failures.push(format!(
                    "{on}: read_async of {what} is still pending after device.poll(wait_indefinitely())"
                )),
            }
        }

        // f16 widened, odd length (the view owns the two bytes after its last
        // element), on every adapter
        let v: Vec<f32> = (0..7).map(|i| 0.1 + i as f32 / 3.0).collect();
        let t = GpuTensor::from_slice_as(ctx, &v, &[7, 1], lay, DType::F16).unwrap();
        let mut fut = std::pin::pin!(t.read_async().unwrap());
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        match poll_once(fut.as_mut()) {
            Poll::Ready(got) => {
                let rounded: Vec<f32> = v.iter().map(|&v| DType::F16.round(v)).collect();
                same_bits(&on, "f16", &got.unwrap(), &rounded);
            }
            Poll::Pending => failures.push(format!(
                "{on}: read_async of an f16 tensor is still pending after device.poll(wait_indefinitely())"
            )),
        }

        // an app that polls its future and its device in turn gets the values
        let mut fut = std::pin::pin!(y.read_async().unwrap());
        let mut resolved = None;
        for _ in 0..100 {
            if let Poll::Ready(v) = poll_once(fut.as_mut()) {
                resolved = Some(v.unwrap());
                break;
            }
            ctx.device()
                .poll(wgpu::PollType::wait_indefinitely())
                .unwrap();
        }
        let got = resolved.unwrap_or_else(|| panic!("{on}: read_async never resolved"));
        same_bits(&on, "y, polled in turn", &got, &read(&y));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Ten training steps of one layer (forward, backward, a host SGD step on
/// weight and bias); the bits of every output and of the final state.
fn train(ctx: &GpuContext, seed: u64, channels: usize) -> Vec<u32> {
    let lay = Layout::ChannelsFirst;
    let dims = [4, channels, 12];
    let c = case(BatchNormConfig::new(channels), &dims, seed);
    let mut bn = layer(ctx, &c);
    let (x, dy) = (upload(ctx, &c.x, lay), upload(ctx, &c.dy, lay));
    let (y, dx) = (poisoned(ctx, &dims, lay), poisoned(ctx, &dims, lay));
    let mut saved = GpuSavedStats::new(&bn).unwrap();
    let mut r = rng(seed + 1000);
    let mut bits = Vec::new();
    let mut keep = |v: &[f32]| bits.extend(v.iter().map(|v| v.to_bits()));
    for step in 0..10 {
        if step > 0 {
            x.write(&flat(&normal(&mut r, &dims, 0.5, 1.5))).unwrap();
            dy.write(&flat(&normal(&mut r, &dims, 0.0, 1.0))).unwrap();
        }
        ctx.run("step", |enc| {
            bn.record_forward_train(enc, &x, &y, Some(&mut saved))?;
            bn.record_backward(enc, &x, &dy, &saved, &dx)
        })
        .unwrap();
        let (dw, db) = (read(bn.dweight().unwrap()), read(bn.dbias().unwrap()));
        keep(&read(&y));
        keep(&read(&dx));
        keep(&dw);
        keep(&db);
        let mut s = bn.state().unwrap();
        for (p, g) in [(&mut s.weight, &dw), (&mut s.bias, &db)] {
            for (p, g) in p.as_mut().unwrap().iter_mut().zip(g) {
                *p -= 0.1 * g;
            }
        }
        bn.set_state(&s).unwrap();
    }
    let s = bn.state().unwrap();
    for v in [s.weight, s.bias, s.running_mean, s.running_var] {
        keep(&v.unwrap());
    }
    assert_eq!(s.num_batches_tracked, Some(3 + 10));
    bits
}

#[test]
fn threads_sharing_one_context_get_the_results_of_running_alone() {
    let jobs = [(101, 3), (102, 5), (103, 8)];
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let alone: Vec<Vec<u32>> = jobs.iter().map(|&(s, c)| train(ctx, s, c)).collect();
        let together: Vec<Vec<u32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|&(s, c)| scope.spawn(move || train(ctx, s, c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
            let t: Vec<f32> = t.iter().map(|&b| f32::from_bits(b)).collect();
            let a: Vec<f32> = a.iter().map(|&b| f32::from_bits(b)).collect();
            same_bits(&on, &format!("thread {i}"), &t, &a);
        }
    });
}

#[test]
fn a_broadcast_view_too_large_to_copy_is_refused_without_allocating() {
    let base = ArrayD::<f32>::from_elem(vec![2, 1, 1], 0.75);
    // 2^40 elements (4 TiB of f32) from 8 bytes
    let huge = base.broadcast(vec![2, 1, 1 << 39]).expect("broadcast");
    let limit = 64 << 20;
    on_every_adapter(|ctx| {
        let on = ctx.label();
        LARGEST_ALLOCATION.store(0, Ordering::Relaxed);
        let e = GpuTensor::from_array(ctx, huge.view(), Layout::ChannelsFirst).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{on}: {e:?}");
        assert!(
            e.to_string().contains("shape [2, 1, 549755813888]"),
            "{on}: {e}"
        );
        let e = GpuTensor::from_array_as(ctx, huge.view(), Layout::ChannelsFirst, DType::F16)
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{on}: {e:?}");
        // through the ndarray interface of a layer
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(1)).unwrap();
        let before = bn.state().unwrap();
        for e in [
            bn.forward_train(huge.view()).unwrap_err(),
            bn.forward_eval(huge.view()).unwrap_err(),
            bn.backward(huge.view(), huge.view(), Mode::Eval)
                .unwrap_err(),
        ] {
            assert!(matches!(e, Error::TooLarge { .. }), "{on}: {e:?}");
        }
        same_state(&on, &bn.state().unwrap(), &before);
        let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
        assert!(
            largest < limit,
            "{on}: an allocation of {largest} bytes while refusing"
        );
    });
}

#[test]
fn trait_methods_work_on_gpu_layers_and_gradients_are_per_channel_vectors() {
    on_every_adapter(|ctx| {
        let on = ctx.label();
        let channels = 4;
        let config = BatchNormConfig::new(channels).with_layout(Layout::ChannelsLast);
        let c = case(config, &[2, 3, 5, channels], 121);
        let want = reference(&c.config, &c.state, &c.x, &c.dy);

        // the BatchNormBackend methods, called as methods
        let mut bn = layer(ctx, &c);
        let y = bn.forward_train(c.x.view()).unwrap();
        assert_eq!(y.shape(), c.x.shape());
        close(&on, "y", &flat(&y), &want.y);
        let saved = bn.saved_stats().unwrap().unwrap();
        close(&on, "save_mean", &saved.mean, &want.saved.mean);
        let g = bn.backward(c.x.view(), c.dy.view(), Mode::Train).unwrap();
        close(&on, "dx", &flat(&g.dx), &want.dx);
        close(&on, "dweight", &g.dweight.unwrap(), &want.dweight);
        close_state(&on, &BatchNormBackend::state(&bn).unwrap(), &want.state);
        let ye = bn.forward_eval(c.x.view()).unwrap();
        assert_eq!(ye.shape(), c.x.shape());

        // the device methods of a channels-last layer
        let mut bn = layer(ctx, &c);
        let x = upload(ctx, &c.x, Layout::ChannelsLast);
        let dy = upload(ctx, &c.dy, Layout::ChannelsLast);
        let fwd = bn.run_forward_train(&x).unwrap();
        assert_eq!(fwd.saved.dims(), Some(c.x.shape()));
        let grads = bn.run_backward(&x, &dy, &fwd.saved).unwrap();
        assert_eq!(grads.dx.shape(), c.x.shape(), "{on}");
        assert_eq!(grads.dx.layout(), Layout::ChannelsLast, "{on}");
        for (what, t, w) in [
            ("dweight", grads.dweight.as_ref().unwrap(), &want.dweight),
            ("dbias", grads.dbias.as_ref().unwrap(), &want.dbias),
            ("layer's dweight", bn.dweight().unwrap(), &want.dweight),
            ("layer's dbias", bn.dbias().unwrap(), &want.dbias),
        ] {
            assert_eq!(t.shape(), &[channels], "{on}: {what}");
            assert_eq!(t.layout(), Layout::ChannelsFirst, "{on}: {what}");
            assert_eq!(t.dtype(), DType::F32, "{on}: {what}");
            close(&on, what, &read(t), w);
        }
        for (what, t) in [
            ("weight", bn.weight().unwrap()),
            ("running_var", bn.running_var().unwrap()),
        ] {
            assert_eq!(
                (t.shape(), t.layout()),
                (&[channels][..], Layout::ChannelsFirst),
                "{on}: {what}"
            );
        }
        close(&on, "dx", &read(&grads.dx), &want.dx);
        close(&on, "y", &read(&fwd.y), &want.y);
    });
}

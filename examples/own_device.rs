//! BatchNorm inside an app that owns its wgpu device, buffers and kernels.
//!
//! The app opens its own instance, adapter and device, wraps them with
//! `GpuContext::from_device`, and records one training step into ONE command
//! encoder, BatchNorm's passes between its own:
//!
//! ```text
//! fill x and a target t   (app kernel, a hash of the index)
//! y  = BatchNorm(x)       (record_forward_train; x is a view of the app's buffer at an offset)
//! r  = relu(y), dy = (y > 0) * (r - t)   (app kernel: the gradient of 0.5 * sum((r - t)^2))
//! dx, dweight, dbias      (record_backward, with the statistics the forward saved)
//! weight -= lr * dweight, bias -= lr * dbias   (app kernel, in place on the layer's tensors)
//! ```
//!
//! It submits once, waits once, and checks y, r, dy, dx, the gradients, the
//! new weight and bias and the running statistics against the f64 CPU
//! reference fed the same x. Exits non-zero when a check fails.
//!
//! ```text
//! cargo run --example own_device
//! WGPU_BACKEND=gl cargo run --example own_device
//! ```

use ndarray::{ArrayD, IxDyn};
use std::error::Error;
use wgpu::util::DeviceExt;
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, BatchNormState, CpuReference, DType, GpuBatchNorm,
    GpuContext, GpuSavedStats, GpuTensor, Layout, Mode,
};

/// The input's shape `(N, C, L)`: BatchNorm1d over 16 channels.
const DIMS: [usize; 3] = [8, 16, 40];
/// Learning rate of the app's SGD step.
const LR: f32 = 1e-3;
/// Workgroup size of the app's kernels.
const WG: u32 = 64;

/// Fills `t` (the target) and `x` (BatchNorm's input; channel `c` centred on
/// `0.5 c - 3` with spread `0.5 + 0.1 c`) from a hash of the element index.
const FILL_WGSL: &str = r"
struct Dims { n: u32, c: u32, l: u32, total: u32 }
@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read_write> t: array<f32>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;

// PCG hash (Jarzynski and Olano, 2020), u32 arithmetic wraps.
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Uniform in [0, 1) from the top 24 bits.
fn unit(v: u32) -> f32 {
    return f32(pcg(v) >> 8u) / 16777216.0;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= dims.total { return; }
    let c = f32((i / dims.l) % dims.c);
    let bump = unit(3u * i) + unit(3u * i + 1u) + unit(3u * i + 2u) - 1.5;
    x[i] = 0.5 * c - 3.0 + (0.5 + 0.1 * c) * 2.0 * bump;
    t[i] = 2.0 * unit(3u * dims.total + i) - 0.5;
}
";

/// `r = relu(y)` and the gradient of `0.5 * sum((r - t)^2)` with respect to y.
const RELU_WGSL: &str = r"
struct Dims { n: u32, c: u32, l: u32, total: u32 }
@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read> t: array<f32>;
@group(0) @binding(3) var<storage, read_write> r: array<f32>;
@group(0) @binding(4) var<storage, read_write> dy: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= dims.total { return; }
    let v = y[i];
    let out = max(v, 0.0);
    r[i] = out;
    dy[i] = select(0.0, out - t[i], v > 0.0);
}
";

/// Plain SGD on the layer's weight and bias. All four bindings are
/// `read_write`: the layer keeps its parameters and gradients in one buffer,
/// and wgpu refuses a dispatch that binds one buffer both read-only and
/// writable.
const SGD_WGSL: &str = r"
struct Step { lr: f32, len: u32 }
@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(4) var<storage, read_write> dbias: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= step.len { return; }
    weight[i] = weight[i] - step.lr * dweight[i];
    bias[i] = bias[i] - step.lr * dbias[i];
}
";

/// `Dims` of the WGSL above.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    n: u32,
    c: u32,
    l: u32,
    total: u32,
}

/// `Step` of `SGD_WGSL` (padded to 16 bytes).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Step {
    lr: f32,
    len: u32,
    pad: [u32; 2],
}

type AnyResult<T> = Result<T, Box<dyn Error>>;

/// The first adapter of the backends in `WGPU_BACKEND` (all by default) that
/// runs compute shaders within `limits`, with a device opened on it.
fn open_device(limits: &wgpu::Limits) -> AnyResult<(wgpu::Device, wgpu::Queue)> {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    let adapter = adapters
        .into_iter()
        .find(|a| {
            a.get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
                && limits.check_limits(&a.limits())
        })
        .ok_or_else(|| {
            format!("no adapter among {backends:?} runs compute shaders within BatchNorm's limits")
        })?;
    let info = adapter.get_info();
    println!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("app device"),
        required_features: wgpu::Features::empty(),
        required_limits: limits.clone(),
        ..Default::default()
    }))?;
    Ok((device, queue))
}

/// A compute pipeline of the one entry point `main` of `wgsl`, with the
/// layout wgpu derives from the shader.
fn pipeline(device: &wgpu::Device, label: &str, wgsl: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    })
}

/// A bind group of `pipeline` over `bindings`, in binding order from 0.
fn bind(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    bindings: &[wgpu::BufferBinding<'_>],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = bindings
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: wgpu::BindingResource::Buffer(b.clone()),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// Records one dispatch of `pipeline` over `items` threads in its own pass.
fn dispatch(
    enc: &mut wgpu::CommandEncoder,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    group: &wgpu::BindGroup,
    items: usize,
) {
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, group, &[]);
    pass.dispatch_workgroups((items as u32).div_ceil(WG), 1, 1);
}

/// A storage buffer of `bytes` the app can read back.
fn app_buffer(device: &wgpu::Device, label: &str, bytes: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// Compares `got` with `want` elementwise (`|got - want| <= atol + rtol |want|`),
/// prints the worst error, and says whether every element passed.
fn check(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> bool {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (mut worst, mut at, mut bad) = (0.0f32, 0, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        // NaN fails too
        if err.is_nan() || err > atol + rtol * w.abs() {
            bad += 1;
        }
        if err > worst || err.is_nan() {
            (worst, at) = (err, i);
        }
    }
    let verdict = if bad == 0 { "ok" } else { "FAIL" };
    println!(
        "{what:<16} max |gpu - ref| = {worst:.2e} at [{at}] (tolerance {atol:.0e} + {rtol:.0e}|ref|, {} values): {verdict}",
        got.len()
    );
    if bad > 0 {
        println!(
            "{:<16} {bad} values out of tolerance; worst gpu {} vs ref {}",
            "", got[at], want[at]
        );
    }
    bad == 0
}

fn main() -> AnyResult<()> {
    env_logger::init();
    // The app's own limits, raised to what BatchNorm needs; no features.
    let limits =
        wgpu::Limits::downlevel_defaults().or_better_values_from(&GpuContext::required_limits());
    let (device, queue) = open_device(&limits)?;
    let ctx = GpuContext::from_device(&device, &queue)?;

    let [n, c, l] = DIMS;
    let total = n * c * l;
    let bytes = (total * 4) as u64;
    // One input buffer holds the target t and, after it at the next aligned
    // offset, BatchNorm's input x.
    let align = u64::from(device.limits().min_storage_buffer_offset_alignment);
    let x_offset = bytes.next_multiple_of(align);
    let input = app_buffer(&device, "app input (t, x)", x_offset + bytes);
    let y_buffer = app_buffer(&device, "app y", bytes);
    let r_buffer = app_buffer(&device, "app relu(y)", bytes);
    let dy_buffer = app_buffer(&device, "app dy", bytes);
    let dx_buffer = app_buffer(&device, "app dx", bytes);

    // Views of the app's buffers, for BatchNorm and for reading back.
    let view = |buffer: &wgpu::Buffer, offset: u64| {
        GpuTensor::from_buffer(
            &ctx,
            buffer,
            offset,
            &DIMS,
            Layout::ChannelsFirst,
            DType::F32,
        )
    };
    let x = view(&input, x_offset)?;
    println!("x: a view of the app's input buffer at byte offset {x_offset} (alignment {align})");
    let t = view(&input, 0)?;
    let (y, r, dy, dx) = (
        view(&y_buffer, 0)?,
        view(&r_buffer, 0)?,
        view(&dy_buffer, 0)?,
        view(&dx_buffer, 0)?,
    );

    // The layer, in a non-trivial state (the CPU reference gets the same).
    let config = BatchNormConfig::new(c);
    let mut bn = GpuBatchNorm::new(&ctx, config.clone())?;
    let ch = |f: fn(f32) -> f32| (0..c).map(|i| f(i as f32)).collect::<Vec<f32>>();
    let initial = BatchNormState {
        weight: Some(ch(|i| 0.5 + 0.1 * i)),
        bias: Some(ch(|i| 0.05 * i - 0.3)),
        running_mean: Some(ch(|i| 0.1 * i)),
        running_var: Some(ch(|i| 1.0 + 0.2 * i)),
        num_batches_tracked: Some(3),
    };
    bn.set_state(&initial)?;
    let mut saved = GpuSavedStats::new(&bn)?;

    // The app's pipelines and bind groups, made once.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let dims = Dims {
        n: n as u32,
        c: c as u32,
        l: l as u32,
        total: total as u32,
    };
    let dims = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("app dims"),
        contents: bytemuck::bytes_of(&dims),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let step = Step {
        lr: LR,
        len: c as u32,
        pad: [0; 2],
    };
    let step = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("app sgd step"),
        contents: bytemuck::bytes_of(&step),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let fill = pipeline(&device, "app fill", FILL_WGSL);
    let relu = pipeline(&device, "app relu", RELU_WGSL);
    let sgd = pipeline(&device, "app sgd", SGD_WGSL);
    let fill_group = bind(
        &device,
        &fill,
        &[dims.as_entire_buffer_binding(), t.binding(), x.binding()],
    );
    let relu_group = bind(
        &device,
        &relu,
        &[
            dims.as_entire_buffer_binding(),
            y.binding(),
            t.binding(),
            r.binding(),
            dy.binding(),
        ],
    );
    // The layer's parameters and gradients are tensors on the device: the
    // app binds them like its own.
    let param = |t: Option<&GpuTensor>| t.cloned().ok_or("an affine layer");
    let (weight, bias) = (param(bn.weight())?, param(bn.bias())?);
    let (dweight, dbias) = (param(bn.dweight())?, param(bn.dbias())?);
    let sgd_group = bind(
        &device,
        &sgd,
        &[
            step.as_entire_buffer_binding(),
            weight.binding(),
            bias.binding(),
            dweight.binding(),
            dbias.binding(),
        ],
    );
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(format!("setting up the app's kernels: {e}").into());
    }

    // One encoder: the app's passes and BatchNorm's, one submit, one wait.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("app training step"),
    });
    dispatch(&mut enc, "app fill", &fill, &fill_group, total);
    bn.record_forward_train(&mut enc, &x, &y, Some(&mut saved))?;
    dispatch(&mut enc, "app relu", &relu, &relu_group, total);
    bn.record_backward(&mut enc, &x, &dy, &saved, &dx)?;
    dispatch(&mut enc, "app sgd", &sgd, &sgd_group, c);
    queue.submit([enc.finish()]);
    device.poll(wgpu::PollType::wait_indefinitely())?;
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(format!("the training step: {e}").into());
    }

    // Read everything back: the copies are submitted now, one poll runs them.
    let pending = [&x, &t, &y, &r, &dy, &dx, &dweight, &dbias, &weight, &bias]
        .map(|tensor| tensor.read_async());
    let running =
        [bn.running_mean(), bn.running_var()].map(|tensor| tensor.expect("tracked").read_async());
    device.poll(wgpu::PollType::wait_indefinitely())?;
    let mut host = Vec::new();
    for p in pending.into_iter().chain(running) {
        host.push(pollster::block_on(p?)?);
    }
    let [
        x_host,
        t_host,
        y_gpu,
        r_gpu,
        dy_gpu,
        dx_gpu,
        dw_gpu,
        db_gpu,
        w_gpu,
        b_gpu,
        rm_gpu,
        rv_gpu,
    ] = <[Vec<f32>; 12]>::try_from(host).expect("twelve tensors");

    // The CPU reference, fed the x the app's kernel wrote and the dy it derived.
    let mut cpu = CpuReference::new(config)?;
    cpu.set_state(&initial)?;
    let x_arr = ArrayD::from_shape_vec(IxDyn(&DIMS), x_host)?;
    let y_ref = cpu.forward_train(x_arr.view())?;
    let dy_arr = ArrayD::from_shape_vec(IxDyn(&DIMS), dy_gpu.clone())?;
    let g_ref = cpu.backward(x_arr.view(), dy_arr.view(), Mode::Train)?;
    let saved_ref = cpu.saved_stats()?.ok_or("saved statistics")?;
    let state_ref = cpu.state()?;
    let saved_gpu = saved.read()?.ok_or("saved statistics")?;
    let y_ref: Vec<f32> = y_ref.iter().copied().collect();
    let relu_ref: Vec<f32> = y_ref.iter().map(|&v| v.max(0.0)).collect();
    // The app's gradient formula on the GPU's own y (the reference backward
    // takes this dy, so the ReLU mask is the same on both sides).
    let dy_want: Vec<f32> = y_gpu
        .iter()
        .zip(&t_host)
        .map(|(&v, &t)| if v > 0.0 { v.max(0.0) - t } else { 0.0 })
        .collect();
    let dw_ref = g_ref.dweight.ok_or("affine")?;
    let db_ref = g_ref.dbias.ok_or("affine")?;
    let sgd_ref = |p: &[f32], g: &[f32]| -> Vec<f32> {
        p.iter()
            .zip(g)
            .map(|(&p, &g)| (f64::from(p) - f64::from(LR) * f64::from(g)) as f32)
            .collect()
    };
    let w_ref = sgd_ref(initial.weight.as_deref().expect("affine"), &dw_ref);
    let b_ref = sgd_ref(initial.bias.as_deref().expect("affine"), &db_ref);

    let dx_ref: Vec<f32> = g_ref.dx.iter().copied().collect();
    let checks = [
        check("y", &y_gpu, &y_ref, 1e-5, 1e-5),
        check("save_mean", &saved_gpu.mean, &saved_ref.mean, 1e-5, 1e-5),
        check(
            "save_invstd",
            &saved_gpu.invstd,
            &saved_ref.invstd,
            1e-5,
            1e-5,
        ),
        check("relu(y)", &r_gpu, &relu_ref, 1e-5, 1e-5),
        check("dy (app)", &dy_gpu, &dy_want, 1e-6, 1e-6),
        check("dx", &dx_gpu, &dx_ref, 1e-5, 1e-4),
        check("dweight", &dw_gpu, &dw_ref, 1e-4, 1e-4),
        check("dbias", &db_gpu, &db_ref, 1e-4, 1e-4),
        check("weight (sgd)", &w_gpu, &w_ref, 1e-5, 1e-5),
        check("bias (sgd)", &b_gpu, &b_ref, 1e-5, 1e-5),
        check(
            "running_mean",
            &rm_gpu,
            state_ref.running_mean.as_deref().expect("tracked"),
            1e-5,
            1e-5,
        ),
        check(
            "running_var",
            &rv_gpu,
            state_ref.running_var.as_deref().expect("tracked"),
            1e-5,
            1e-5,
        ),
    ];
    let tracked = bn.num_batches_tracked()?;
    println!(
        "num_batches_tracked = {tracked:?} (reference {:?})",
        state_ref.num_batches_tracked
    );
    let failed = checks.iter().filter(|ok| !**ok).count()
        + usize::from(tracked != state_ref.num_batches_tracked);
    if failed > 0 {
        return Err(format!("{failed} checks failed").into());
    }
    println!("all checks passed: one submit ran the app's kernels and BatchNorm's");
    Ok(())
}

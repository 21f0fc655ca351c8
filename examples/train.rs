//! A small network trained entirely on the GPU, with this crate's BatchNorm
//! recorded between the app's own kernels, then the same training on the
//! host with the CPU reference's BatchNorm, and the two loss curves compared.
//!
//! ```text
//! x (2) -> Linear(2, 32) -> BatchNorm1d(32) -> ReLU -> Linear(32, 3) -> softmax cross-entropy
//! ```
//!
//! The task: which of three noisy concentric rings (radii 1, 2, 3) a point
//! of the plane lies on, 384 points drawn with a fixed seed. SGD with
//! momentum, minibatches of 64, 300 steps. Every step is one command encoder
//! and one submit: the app's WGSL kernels (matmuls with bias, ReLU,
//! softmax cross-entropy and its gradient, weight gradients, SGD) and
//! `GpuBatchNorm::record_forward_train` / `record_backward`; the optimizer
//! updates BatchNorm's `weight` and `bias` in place from its `dweight` and
//! `dbias`. The loss of every step stays on the device until it is read
//! back every 25 steps.
//!
//! ```text
//! cargo run --example train
//! WGPU_BACKEND=gl cargo run --example train
//! ```

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::error::Error;
use std::time::Instant;
use wgpu::util::DeviceExt;
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, CpuReference, GpuBatchNorm, GpuContext, GpuSavedStats,
    GpuTensor, Layout, Mode,
};

const INPUTS: usize = 2;
const HIDDEN: usize = 32;
const CLASSES: usize = 3;
const SAMPLES: usize = 384;
const BATCH: usize = 64;
const STEPS: usize = 300;
const LR: f32 = 0.1;
const MOMENTUM: f32 = 0.9;
const SEED: u64 = 9;
/// Steps between readbacks of the loss.
const REPORT_EVERY: usize = 25;
/// The GPU's and the host's loss agree to this relative error over the first
/// `AGREE_STEPS` steps.
const AGREE_RTOL: f64 = 1e-3;
const AGREE_STEPS: usize = 100;
/// Accuracy over all samples (BatchNorm in evaluation mode) the training must reach.
const MIN_ACCURACY: f64 = 0.95;
/// Workgroup size of the app's kernels.
const WG: u32 = 64;

/// `out[n, j] = bias[j] + sum_k input[n, k] weight[j, k]` (PyTorch's `Linear`:
/// `weight` is `(outputs, inputs)`). One thread per output.
const LINEAR_FORWARD: &str = r"
struct Linear { rows: u32, inputs: u32, outputs: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Linear;
@group(0) @binding(1) var<storage, read> input: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= p.rows * p.outputs { return; }
    let n = i / p.outputs;
    let j = i % p.outputs;
    var acc = bias[j];
    for (var k = 0u; k < p.inputs; k++) {
        acc += input[n * p.inputs + k] * weight[j * p.inputs + k];
    }
    out[i] = acc;
}
";

/// `out = max(x, 0)`.
const RELU: &str = r"
struct Len { len: u32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<uniform> p: Len;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= p.len { return; }
    out[i] = max(x[i], 0.0);
}
";

/// Mean softmax cross-entropy of `rows` rows of logits against their labels,
/// its gradient `dlogits = (softmax - onehot) / rows`, and the accuracy:
/// `out = [loss, accuracy]`. One workgroup; each thread takes every 64th row.
const SOFTMAX_XENT: &str = r"
struct Xent { rows: u32, classes: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Xent;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> loss_part: array<f32, 64>;
var<workgroup> hit_part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) t: u32) {
    var loss = 0.0;
    var hits = 0.0;
    let scale = 1.0 / f32(p.rows);
    for (var n = t; n < p.rows; n += 64u) {
        let base = n * p.classes;
        let label = labels[n];
        var top = logits[base];
        var best = 0u;
        for (var j = 1u; j < p.classes; j++) {
            if logits[base + j] > top {
                top = logits[base + j];
                best = j;
            }
        }
        var sum = 0.0;
        for (var j = 0u; j < p.classes; j++) {
            sum += exp(logits[base + j] - top);
        }
        loss += log(sum) + top - logits[base + label];
        hits += select(0.0, 1.0, best == label);
        for (var j = 0u; j < p.classes; j++) {
            let prob = exp(logits[base + j] - top) / sum;
            dlogits[base + j] = (prob - select(0.0, 1.0, j == label)) * scale;
        }
    }
    loss_part[t] = loss;
    hit_part[t] = hits;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if t < s {
            loss_part[t] += loss_part[t + s];
            hit_part[t] += hit_part[t + s];
        }
        workgroupBarrier();
    }
    if t == 0u {
        out[0] = loss_part[0] * scale;
        out[1] = hit_part[0] * scale;
    }
}
";

/// Gradients of a `Linear`: `dweight[j, k] = sum_n dout[n, j] input[n, k]`,
/// `dbias[j] = sum_n dout[n, j]`. One thread per weight (and per bias).
const LINEAR_BACKWARD_WEIGHT: &str = r"
struct Linear { rows: u32, inputs: u32, outputs: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Linear;
@group(0) @binding(1) var<storage, read> dout: array<f32>;
@group(0) @binding(2) var<storage, read> input: array<f32>;
@group(0) @binding(3) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(4) var<storage, read_write> dbias: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let per_output = p.inputs + 1u;
    if i >= p.outputs * per_output { return; }
    let j = i / per_output;
    let k = i % per_output;
    var acc = 0.0;
    if k == p.inputs {
        for (var n = 0u; n < p.rows; n++) {
            acc += dout[n * p.outputs + j];
        }
        dbias[j] = acc;
    } else {
        for (var n = 0u; n < p.rows; n++) {
            acc += dout[n * p.outputs + j] * input[n * p.inputs + k];
        }
        dweight[j * p.inputs + k] = acc;
    }
}
";

/// The gradient of a `Linear`'s input through the ReLU before it:
/// `dz[n, k] = (z[n, k] > 0) sum_j dout[n, j] weight[j, k]`.
const LINEAR_BACKWARD_INPUT_RELU: &str = r"
struct Linear { rows: u32, inputs: u32, outputs: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Linear;
@group(0) @binding(1) var<storage, read> dout: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> z: array<f32>;
@group(0) @binding(4) var<storage, read_write> dz: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= p.rows * p.inputs { return; }
    let n = i / p.inputs;
    let k = i % p.inputs;
    var acc = 0.0;
    if z[i] > 0.0 {
        for (var j = 0u; j < p.outputs; j++) {
            acc += dout[n * p.outputs + j] * weight[j * p.inputs + k];
        }
    }
    dz[i] = acc;
}
";

/// SGD with momentum (PyTorch's): `v = momentum v + grad`, `param -= lr v`.
/// `grad` is bound `read_write`: BatchNorm keeps `weight` and `dweight` in
/// one buffer, and wgpu refuses a dispatch that binds one buffer both
/// read-only and writable.
const SGD: &str = r"
struct Sgd { lr: f32, momentum: f32, len: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Sgd;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> velocity: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= p.len { return; }
    let v = p.momentum * velocity[i] + grad[i];
    velocity[i] = v;
    param[i] = param[i] - p.lr * v;
}
";

/// Uniform blocks of the kernels above (16 bytes each).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims4([u32; 4]);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SgdParams {
    lr: f32,
    momentum: f32,
    len: u32,
    pad: u32,
}

type AnyResult<T> = Result<T, Box<dyn Error>>;

/// The data set: points on three noisy rings, shuffled; `labels[i]` is the ring of point `i`.
struct Data {
    x: Vec<f32>,
    labels: Vec<u32>,
}

fn rings(rng: &mut StdRng) -> Data {
    let noise = Normal::new(0.0f32, 0.15).expect("valid normal");
    let mut points: Vec<([f32; 2], u32)> = (0..SAMPLES)
        .map(|i| {
            let label = (i % CLASSES) as u32;
            let radius = 1.0 + label as f32 + noise.sample(rng);
            let angle = rng.random_range(0.0..std::f32::consts::TAU);
            ([radius * angle.cos(), radius * angle.sin()], label)
        })
        .collect();
    points.shuffle(rng);
    Data {
        x: points.iter().flat_map(|(p, _)| *p).collect(),
        labels: points.iter().map(|(_, l)| *l).collect(),
    }
}

/// The network's parameters: `Linear(2, 32)`, BatchNorm's weight and bias, `Linear(32, 3)`.
#[derive(Clone)]
struct Params {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// PyTorch's default `Linear` initialization: `U(-1/sqrt(inputs), 1/sqrt(inputs))`.
fn init(rng: &mut StdRng) -> Params {
    let mut uniform = |len: usize, inputs: usize| -> Vec<f32> {
        let bound = 1.0 / (inputs as f32).sqrt();
        (0..len).map(|_| rng.random_range(-bound..bound)).collect()
    };
    Params {
        w1: uniform(HIDDEN * INPUTS, INPUTS),
        b1: uniform(HIDDEN, INPUTS),
        w2: uniform(CLASSES * HIDDEN, HIDDEN),
        b2: uniform(CLASSES, HIDDEN),
    }
}

/// The first row of the minibatch of `step`: the shuffled samples in order, round and round.
fn batch_start(step: usize) -> usize {
    (step * BATCH) % SAMPLES
}

/// The app's kernels on one device.
struct Kernels {
    linear_forward: wgpu::ComputePipeline,
    relu: wgpu::ComputePipeline,
    softmax_xent: wgpu::ComputePipeline,
    linear_backward_weight: wgpu::ComputePipeline,
    linear_backward_input_relu: wgpu::ComputePipeline,
    sgd: wgpu::ComputePipeline,
}

impl Kernels {
    fn new(device: &wgpu::Device) -> Self {
        let make = |label: &str, wgsl: &str| {
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
        };
        Self {
            linear_forward: make("app.linear_forward", LINEAR_FORWARD),
            relu: make("app.relu", RELU),
            softmax_xent: make("app.softmax_xent", SOFTMAX_XENT),
            linear_backward_weight: make("app.linear_backward_weight", LINEAR_BACKWARD_WEIGHT),
            linear_backward_input_relu: make(
                "app.linear_backward_input_relu",
                LINEAR_BACKWARD_INPUT_RELU,
            ),
            sgd: make("app.sgd", SGD),
        }
    }
}

/// One dispatch of an app kernel, bound once and recorded every step.
struct Call<'k> {
    pipeline: &'k wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    workgroups: u32,
}

impl<'k> Call<'k> {
    /// `pipeline` over a uniform block holding `uniform` and `bindings`
    /// (bindings 1, 2, ...), `threads` threads.
    fn new(
        device: &wgpu::Device,
        pipeline: &'k wgpu::ComputePipeline,
        uniform: &[u8],
        bindings: &[wgpu::BufferBinding<'_>],
        threads: usize,
    ) -> Self {
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("app uniform"),
            contents: uniform,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(
            bindings
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(b.clone()),
                }),
        );
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Self {
            pipeline,
            group,
            workgroups: (threads as u32).div_ceil(WG),
        }
    }
}

/// Records `calls` into one compute pass, in order.
fn record(enc: &mut wgpu::CommandEncoder, label: &str, calls: &[&Call<'_>]) {
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    for c in calls {
        pass.set_pipeline(c.pipeline);
        pass.set_bind_group(0, &c.group, &[]);
        pass.dispatch_workgroups(c.workgroups, 1, 1);
    }
}

/// A tensor of `dims` holding `data`, on the device.
fn tensor(ctx: &GpuContext, data: &[f32], dims: &[usize]) -> AnyResult<GpuTensor> {
    Ok(GpuTensor::from_slice(
        ctx,
        data,
        dims,
        Layout::ChannelsFirst,
    )?)
}

/// A tensor of `dims` to be written by a kernel.
fn scratch(ctx: &GpuContext, dims: &[usize]) -> AnyResult<GpuTensor> {
    Ok(GpuTensor::uninit(ctx, dims, Layout::ChannelsFirst)?)
}

fn linear_dims(rows: usize, inputs: usize, outputs: usize) -> Dims4 {
    Dims4([rows as u32, inputs as u32, outputs as u32, 0])
}

/// What a training run reports: the loss and accuracy of every step's
/// minibatch, and the loss and accuracy over all samples in evaluation mode.
struct Run {
    loss: Vec<f64>,
    eval_loss: f64,
    eval_accuracy: f64,
}

/// The whole training on the GPU.
fn train_gpu(ctx: &GpuContext, data: &Data, params: &Params) -> AnyResult<Run> {
    let device = ctx.device();
    // wgpu's validation errors in the app's setup and steps come back as Err
    let setup = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let k = Kernels::new(device);
    let lr = |len: usize| SgdParams {
        lr: LR,
        momentum: MOMENTUM,
        len: len as u32,
        pad: 0,
    };

    // The data set and the parameters, uploaded once.
    let x_all = tensor(ctx, &data.x, &[SAMPLES, INPUTS])?;
    let labels_all = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("app labels"),
        contents: bytemuck::cast_slice(&data.labels),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let w1 = tensor(ctx, &params.w1, &[HIDDEN, INPUTS])?;
    let b1 = tensor(ctx, &params.b1, &[HIDDEN])?;
    let w2 = tensor(ctx, &params.w2, &[CLASSES, HIDDEN])?;
    let b2 = tensor(ctx, &params.b2, &[CLASSES])?;
    let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(HIDDEN))?;
    let param = |t: Option<&GpuTensor>| t.cloned().ok_or("an affine layer");
    let (gamma, beta) = (param(bn.weight())?, param(bn.bias())?);
    let (dgamma, dbeta) = (param(bn.dweight())?, param(bn.dbias())?);

    // Activations and gradients of one minibatch.
    let xb = scratch(ctx, &[BATCH, INPUTS])?;
    let labels = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app minibatch labels"),
        size: (BATCH * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let h = scratch(ctx, &[BATCH, HIDDEN])?; // Linear 1, BatchNorm's input
    let z = scratch(ctx, &[BATCH, HIDDEN])?; // BatchNorm's output
    let a = scratch(ctx, &[BATCH, HIDDEN])?; // ReLU
    let logits = scratch(ctx, &[BATCH, CLASSES])?;
    let dlogits = scratch(ctx, &[BATCH, CLASSES])?;
    let step_out = scratch(ctx, &[2])?; // [loss, accuracy]
    let history = scratch(ctx, &[STEPS, 2])?;
    let dz = scratch(ctx, &[BATCH, HIDDEN])?;
    let dh = scratch(ctx, &[BATCH, HIDDEN])?;
    let (dw1, db1) = (scratch(ctx, &[HIDDEN, INPUTS])?, scratch(ctx, &[HIDDEN])?);
    let (dw2, db2) = (scratch(ctx, &[CLASSES, HIDDEN])?, scratch(ctx, &[CLASSES])?);
    let zeros = |len: usize| tensor(ctx, &vec![0.0; len], &[len]);
    let velocity = [
        zeros(HIDDEN * INPUTS)?,
        zeros(HIDDEN)?,
        zeros(HIDDEN)?,
        zeros(HIDDEN)?,
        zeros(CLASSES * HIDDEN)?,
        zeros(CLASSES)?,
    ];
    let mut saved = GpuSavedStats::new(&bn)?;

    // Every dispatch of a step, bound once.
    let bytes = bytemuck::bytes_of;
    let (lin1, lin2) = (
        linear_dims(BATCH, INPUTS, HIDDEN),
        linear_dims(BATCH, HIDDEN, CLASSES),
    );
    let forward1 = Call::new(
        device,
        &k.linear_forward,
        bytes(&lin1),
        &[xb.binding(), w1.binding(), b1.binding(), h.binding()],
        BATCH * HIDDEN,
    );
    let n_hidden = Dims4([(BATCH * HIDDEN) as u32, 0, 0, 0]);
    let relu = Call::new(
        device,
        &k.relu,
        bytes(&n_hidden),
        &[z.binding(), a.binding()],
        BATCH * HIDDEN,
    );
    let forward2 = Call::new(
        device,
        &k.linear_forward,
        bytes(&lin2),
        &[a.binding(), w2.binding(), b2.binding(), logits.binding()],
        BATCH * CLASSES,
    );
    let xent = Dims4([BATCH as u32, CLASSES as u32, 0, 0]);
    let loss = Call::new(
        device,
        &k.softmax_xent,
        bytes(&xent),
        &[
            logits.binding(),
            labels.as_entire_buffer_binding(),
            dlogits.binding(),
            step_out.binding(),
        ],
        WG as usize,
    );
    let backward2 = Call::new(
        device,
        &k.linear_backward_weight,
        bytes(&lin2),
        &[dlogits.binding(), a.binding(), dw2.binding(), db2.binding()],
        CLASSES * (HIDDEN + 1),
    );
    let backward2_input = Call::new(
        device,
        &k.linear_backward_input_relu,
        bytes(&lin2),
        &[dlogits.binding(), w2.binding(), z.binding(), dz.binding()],
        BATCH * HIDDEN,
    );
    let backward1 = Call::new(
        device,
        &k.linear_backward_weight,
        bytes(&lin1),
        &[dh.binding(), xb.binding(), dw1.binding(), db1.binding()],
        HIDDEN * (INPUTS + 1),
    );
    let updates: Vec<Call<'_>> = [
        (&w1, &dw1),
        (&b1, &db1),
        (&gamma, &dgamma),
        (&beta, &dbeta),
        (&w2, &dw2),
        (&b2, &db2),
    ]
    .iter()
    .zip(&velocity)
    .map(|((p, g), v)| {
        Call::new(
            device,
            &k.sgd,
            bytemuck::bytes_of(&lr(p.len())),
            &[p.binding(), g.binding(), v.binding()],
            p.len(),
        )
    })
    .collect();
    let updates: Vec<&Call<'_>> = updates.iter().collect();
    if let Some(e) = pollster::block_on(setup.pop()) {
        return Err(format!("setting up the app's kernels: {e}").into());
    }

    // One encoder and one submit per step, not waited for: the readback of
    // the loss every REPORT_EVERY steps waits for the steps before it.
    let mut loss_curve = Vec::with_capacity(STEPS);
    let mut scope: Option<wgpu::ErrorScopeGuard> = None;
    for step in 0..STEPS {
        let row = batch_start(step);
        if scope.is_none() {
            scope = Some(device.push_error_scope(wgpu::ErrorFilter::Validation));
        }
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("app training step"),
        });
        // the minibatch: rows [row, row + BATCH) of the data set
        enc.copy_buffer_to_buffer(
            x_all.buffer(),
            (row * INPUTS * 4) as u64,
            xb.buffer(),
            xb.offset(),
            Some((BATCH * INPUTS * 4) as u64),
        );
        enc.copy_buffer_to_buffer(
            &labels_all,
            (row * 4) as u64,
            &labels,
            0,
            Some((BATCH * 4) as u64),
        );
        record(&mut enc, "app.forward1", &[&forward1]);
        bn.record_forward_train(&mut enc, &h, &z, Some(&mut saved))?;
        record(
            &mut enc,
            "app.forward2_loss_backward2",
            &[&relu, &forward2, &loss, &backward2, &backward2_input],
        );
        enc.copy_buffer_to_buffer(
            step_out.buffer(),
            step_out.offset(),
            history.buffer(),
            history.offset() + (step * 8) as u64,
            Some(8),
        );
        bn.record_backward(&mut enc, &h, &dz, &saved, &dh)?;
        let mut tail = vec![&backward1];
        tail.extend(updates.iter().copied());
        record(&mut enc, "app.backward1_sgd", &tail);
        ctx.queue().submit([enc.finish()]);

        if (step + 1) % REPORT_EVERY == 0 || step + 1 == STEPS {
            if let Some(e) = pollster::block_on(scope.take().expect("pushed").pop()) {
                return Err(format!("training steps up to {step}: {e}").into());
            }
            let history = history.to_vec()?;
            let first = loss_curve.len();
            loss_curve.extend((first..=step).map(|s| f64::from(history[2 * s])));
            let accuracy = (first..=step)
                .map(|s| f64::from(history[2 * s + 1]))
                .sum::<f64>();
            println!(
                "  steps {first:>3}..{:<3}  mean loss {:.4}  mean minibatch accuracy {:.3}",
                step + 1,
                mean(&loss_curve[first..]),
                accuracy / (step + 1 - first) as f64
            );
        }
    }

    // Evaluation mode over all samples: BatchNorm with its running statistics.
    let h_all = scratch(ctx, &[SAMPLES, HIDDEN])?;
    let z_all = scratch(ctx, &[SAMPLES, HIDDEN])?;
    let a_all = scratch(ctx, &[SAMPLES, HIDDEN])?;
    let logits_all = scratch(ctx, &[SAMPLES, CLASSES])?;
    let dlogits_all = scratch(ctx, &[SAMPLES, CLASSES])?;
    let eval_out = scratch(ctx, &[2])?;
    let eval1 = Call::new(
        device,
        &k.linear_forward,
        bytes(&linear_dims(SAMPLES, INPUTS, HIDDEN)),
        &[x_all.binding(), w1.binding(), b1.binding(), h_all.binding()],
        SAMPLES * HIDDEN,
    );
    let eval_relu = Call::new(
        device,
        &k.relu,
        bytes(&Dims4([(SAMPLES * HIDDEN) as u32, 0, 0, 0])),
        &[z_all.binding(), a_all.binding()],
        SAMPLES * HIDDEN,
    );
    let eval2 = Call::new(
        device,
        &k.linear_forward,
        bytes(&linear_dims(SAMPLES, HIDDEN, CLASSES)),
        &[
            a_all.binding(),
            w2.binding(),
            b2.binding(),
            logits_all.binding(),
        ],
        SAMPLES * CLASSES,
    );
    let eval_loss = Call::new(
        device,
        &k.softmax_xent,
        bytes(&Dims4([SAMPLES as u32, CLASSES as u32, 0, 0])),
        &[
            logits_all.binding(),
            labels_all.as_entire_buffer_binding(),
            dlogits_all.binding(),
            eval_out.binding(),
        ],
        WG as usize,
    );
    ctx.run("evaluation", |enc| {
        record(enc, "app.eval1", &[&eval1]);
        bn.record_forward_eval(enc, &h_all, &z_all, None)?;
        record(enc, "app.eval2", &[&eval_relu, &eval2, &eval_loss]);
        Ok(())
    })?;
    let out = eval_out.to_vec()?;
    Ok(Run {
        loss: loss_curve,
        eval_loss: f64::from(out[0]),
        eval_accuracy: f64::from(out[1]),
    })
}

/// `out[n, j] = bias[j] + sum_k input[n, k] weight[j, k]`, accumulated in f64.
fn linear(input: &[f32], weight: &[f32], bias: &[f32], inputs: usize) -> Vec<f32> {
    let outputs = bias.len();
    input
        .chunks_exact(inputs)
        .flat_map(|row| {
            (0..outputs).map(move |j| {
                let w = &weight[j * inputs..(j + 1) * inputs];
                let dot: f64 = row
                    .iter()
                    .zip(w)
                    .map(|(&x, &w)| f64::from(x) * f64::from(w))
                    .sum();
                (f64::from(bias[j]) + dot) as f32
            })
        })
        .collect()
}

/// Mean softmax cross-entropy, its gradient `(softmax - onehot) / rows`, and
/// the accuracy, in f64.
fn softmax_xent(logits: &[f32], labels: &[u32]) -> (f64, Vec<f32>, f64) {
    let rows = labels.len();
    let mut dlogits = vec![0.0f32; logits.len()];
    let (mut loss, mut hits) = (0.0, 0);
    for (n, row) in logits.chunks_exact(CLASSES).enumerate() {
        let label = labels[n] as usize;
        let (best, top) = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |(b, t), (j, &v)| {
                    if v > t { (j, v) } else { (b, t) }
                },
            );
        let exps: Vec<f64> = row.iter().map(|&v| f64::from(v - top).exp()).collect();
        let sum: f64 = exps.iter().sum();
        loss += sum.ln() + f64::from(top) - f64::from(row[label]);
        hits += usize::from(best == label);
        for j in 0..CLASSES {
            let onehot = if j == label { 1.0 } else { 0.0 };
            dlogits[n * CLASSES + j] = ((exps[j] / sum - onehot) / rows as f64) as f32;
        }
    }
    (loss / rows as f64, dlogits, hits as f64 / rows as f64)
}

/// `(dweight, dbias)` of a `Linear` from its input and output gradient, in f64.
fn linear_grads(dout: &[f32], input: &[f32], inputs: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = input.len() / inputs;
    let outputs = dout.len() / rows;
    let mut dw = vec![0.0f32; outputs * inputs];
    let mut db = vec![0.0f32; outputs];
    for j in 0..outputs {
        db[j] = (0..rows)
            .map(|n| f64::from(dout[n * outputs + j]))
            .sum::<f64>() as f32;
        for k in 0..inputs {
            dw[j * inputs + k] = (0..rows)
                .map(|n| f64::from(dout[n * outputs + j]) * f64::from(input[n * inputs + k]))
                .sum::<f64>() as f32;
        }
    }
    (dw, db)
}

/// SGD with momentum, as the `SGD` kernel.
fn sgd(param: &mut [f32], grad: &[f32], velocity: &mut [f32]) {
    for ((p, &g), v) in param.iter_mut().zip(grad).zip(velocity.iter_mut()) {
        *v = MOMENTUM * *v + g;
        *p -= LR * *v;
    }
}

/// The same training on the host, with BatchNorm computed by the CPU
/// reference (ndarray in and out) and everything else in f64 accumulators
/// over f32 values, as the kernels store them.
fn train_host(data: &Data, params: &Params) -> AnyResult<Run> {
    let mut p = params.clone();
    let mut bn = CpuReference::new(BatchNormConfig::new(HIDDEN))?;
    let mut velocity = [
        vec![0.0; HIDDEN * INPUTS],
        vec![0.0; HIDDEN],
        vec![0.0; HIDDEN],
        vec![0.0; HIDDEN],
        vec![0.0; CLASSES * HIDDEN],
        vec![0.0; CLASSES],
    ];
    let mut loss_curve = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        let row = batch_start(step);
        let xb = &data.x[row * INPUTS..(row + BATCH) * INPUTS];
        let labels = &data.labels[row..row + BATCH];
        let h = linear(xb, &p.w1, &p.b1, INPUTS);
        let h = ArrayD::from_shape_vec(IxDyn(&[BATCH, HIDDEN]), h)?;
        let z = bn.forward_train(h.view())?;
        let z: Vec<f32> = z.iter().copied().collect();
        let a: Vec<f32> = z.iter().map(|&v| v.max(0.0)).collect();
        let logits = linear(&a, &p.w2, &p.b2, HIDDEN);
        let (loss, dlogits, _) = softmax_xent(&logits, labels);
        loss_curve.push(loss);
        let (dw2, db2) = linear_grads(&dlogits, &a, HIDDEN);
        let dz: Vec<f32> = (0..BATCH * HIDDEN)
            .map(|i| {
                let (n, k) = (i / HIDDEN, i % HIDDEN);
                if z[i] > 0.0 {
                    (0..CLASSES)
                        .map(|j| {
                            f64::from(dlogits[n * CLASSES + j]) * f64::from(p.w2[j * HIDDEN + k])
                        })
                        .sum::<f64>() as f32
                } else {
                    0.0
                }
            })
            .collect();
        let dz = ArrayD::from_shape_vec(IxDyn(&[BATCH, HIDDEN]), dz)?;
        let g = bn.backward(h.view(), dz.view(), Mode::Train)?;
        let dh: Vec<f32> = g.dx.iter().copied().collect();
        let (dw1, db1) = linear_grads(&dh, xb, INPUTS);
        let mut state = bn.state()?;
        let [v_w1, v_b1, v_gamma, v_beta, v_w2, v_b2] = &mut velocity;
        sgd(&mut p.w1, &dw1, v_w1);
        sgd(&mut p.b1, &db1, v_b1);
        let gamma = state.weight.as_mut().ok_or("affine")?;
        sgd(gamma, g.dweight.as_deref().ok_or("affine")?, v_gamma);
        let beta = state.bias.as_mut().ok_or("affine")?;
        sgd(beta, g.dbias.as_deref().ok_or("affine")?, v_beta);
        bn.set_state(&state)?;
        sgd(&mut p.w2, &dw2, v_w2);
        sgd(&mut p.b2, &db2, v_b2);
    }
    let h = linear(&data.x, &p.w1, &p.b1, INPUTS);
    let h = ArrayD::from_shape_vec(IxDyn(&[SAMPLES, HIDDEN]), h)?;
    let a: Vec<f32> = bn
        .forward_eval(h.view())?
        .iter()
        .map(|&v| v.max(0.0))
        .collect();
    let (eval_loss, _, eval_accuracy) =
        softmax_xent(&linear(&a, &p.w2, &p.b2, HIDDEN), &data.labels);
    Ok(Run {
        loss: loss_curve,
        eval_loss,
        eval_accuracy,
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Largest `|a - b| / |b|` over `steps` (NaN counts as infinite), and its step.
fn max_rel_diff(a: &[f64], b: &[f64], steps: std::ops::Range<usize>) -> (f64, usize) {
    steps
        .map(|s| {
            let d = (a[s] - b[s]).abs() / b[s].abs();
            (if d.is_nan() { f64::INFINITY } else { d }, s)
        })
        .fold((0.0, 0), |best, e| if e.0 > best.0 { e } else { best })
}

fn main() -> AnyResult<()> {
    env_logger::init();
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.label());
    let mut rng = StdRng::seed_from_u64(SEED);
    let data = rings(&mut rng);
    let params = init(&mut rng);
    println!(
        "{SAMPLES} points on {CLASSES} rings; Linear({INPUTS}, {HIDDEN}) -> BatchNorm1d({HIDDEN}) -> ReLU -> Linear({HIDDEN}, {CLASSES}); \
         SGD lr {LR} momentum {MOMENTUM}, minibatches of {BATCH}, {STEPS} steps"
    );

    println!("training on the GPU (one submit per step):");
    let start = Instant::now();
    let gpu = train_gpu(&ctx, &data, &params)?;
    let gpu_time = start.elapsed();
    println!("training on the host, BatchNorm by the CPU reference:");
    let start = Instant::now();
    let host = train_host(&data, &params)?;
    let host_time = start.elapsed();

    let tail = |l: &[f64]| mean(&l[STEPS - REPORT_EVERY..]);
    let (gpu_first, gpu_last) = (gpu.loss[0], tail(&gpu.loss));
    println!(
        "gpu : loss {gpu_first:.4} at step 0, {gpu_last:.4} over the last {REPORT_EVERY} steps; \
         all {SAMPLES} samples (evaluation mode): loss {:.4}, accuracy {:.3}  [{:.2} s]",
        gpu.eval_loss,
        gpu.eval_accuracy,
        gpu_time.as_secs_f64()
    );
    println!(
        "host: loss {:.4} at step 0, {:.4} over the last {REPORT_EVERY} steps; \
         all {SAMPLES} samples (evaluation mode): loss {:.4}, accuracy {:.3}  [{:.2} s]",
        host.loss[0],
        tail(&host.loss),
        host.eval_loss,
        host.eval_accuracy,
        host_time.as_secs_f64()
    );
    let (agree, at) = max_rel_diff(&gpu.loss, &host.loss, 0..AGREE_STEPS);
    let (agree_all, at_all) = max_rel_diff(&gpu.loss, &host.loss, 0..STEPS);
    println!(
        "loss curves, max |gpu - host| / host: {agree:.2e} over steps 0..{AGREE_STEPS} (at step {at}), \
         {agree_all:.2e} over all {STEPS} steps (at step {at_all})"
    );

    let mut failures = Vec::new();
    if gpu_last.is_nan() || gpu_last >= 0.5 * gpu_first {
        failures.push(format!(
            "the loss did not halve: {gpu_first:.4} at step 0, {gpu_last:.4} at the end"
        ));
    }
    if gpu.eval_accuracy.is_nan() || gpu.eval_accuracy < MIN_ACCURACY {
        failures.push(format!(
            "accuracy {:.3} is below {MIN_ACCURACY}",
            gpu.eval_accuracy
        ));
    }
    if agree > AGREE_RTOL {
        failures.push(format!(
            "the GPU's and the host's losses differ by {agree:.2e} (relative) at step {at}, more than {AGREE_RTOL:.0e}"
        ));
    }
    if !failures.is_empty() {
        return Err(failures.join("; ").into());
    }
    println!(
        "ok: the loss halved, accuracy >= {MIN_ACCURACY}, the curves agree within {AGREE_RTOL:.0e} over the first {AGREE_STEPS} steps"
    );
    Ok(())
}

//! BatchNorm on a wgpu device: the layer, its buffers and state. The
//! operations are in `forward.rs` and `backward.rs`, one method per pass; the
//! blocking `run_*` methods and the ndarray interface are built on them.

mod backend;
mod backward;
mod cache;
mod forward;
mod grid;
mod plan;
mod run;
mod saved;
mod single;
mod state;
mod storage;
mod sync;

pub use cache::GpuResourceCounts;
pub use saved::GpuSavedStats;

use super::context::GpuContext;
use super::kernels::{self, KernelRef, Params};
use super::tensor::GpuTensor;
use crate::config::BatchNormConfig;
use crate::error::{Error, Result};
use crate::layout::{DType, Layout};
use crate::state::BatchNormState;
use crate::validate;
use cache::Cache;
use grid::Fill;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

/// Sections of a layer's state buffer, in units of its stride.
/// Keep in sync with the section constants of shaders/common.wgsl.
mod section {
    pub const WEIGHT: usize = 0;
    pub const BIAS: usize = 1;
    pub const RUNNING_MEAN: usize = 2;
    pub const RUNNING_VAR: usize = 3;
    pub const DWEIGHT: usize = 4;
    pub const DBIAS: usize = 5;
    /// `u32` words: num_batches_tracked (low, high), the momentum factor's bits.
    pub const COUNTER: usize = 6;
    pub const COUNT: usize = 7;
}

/// The result of a blocking forward: the output and the statistics its
/// backward needs.
#[derive(Debug)]
pub struct GpuForward {
    /// The normalized output, on the device.
    pub y: GpuTensor,
    /// What [`GpuBatchNorm::run_backward`] of this forward takes.
    pub saved: GpuSavedStats,
}

/// Gradients of a GPU backward pass, left on the device.
#[derive(Debug, Clone)]
pub struct GpuGradients {
    /// Gradient with respect to the input.
    pub dx: GpuTensor,
    /// Gradient with respect to `weight`, shape `(C,)` (affine only).
    /// Per-channel vectors are tagged [`Layout::ChannelsFirst`], which for a
    /// 1-D tensor is the same memory as channels-last.
    pub dweight: Option<GpuTensor>,
    /// Gradient with respect to `bias`, shape `(C,)` (affine only).
    pub dbias: Option<GpuTensor>,
}

/// Gradients of a fused GPU backward
/// ([`GpuBatchNorm::run_backward_fused`]), left on the device.
#[derive(Debug, Clone)]
pub struct GpuFusedGradients {
    /// The BatchNorm's gradients: `dx`, `dweight`, `dbias`.
    pub grads: GpuGradients,
    /// Gradient with respect to the residual `z` (the gated `dy`), when the
    /// fusion has one.
    pub dz: Option<GpuTensor>,
}

/// The per-channel tensors of a layer, views of its state buffer.
#[derive(Debug)]
struct Views {
    weight: GpuTensor,
    bias: GpuTensor,
    running_mean: GpuTensor,
    running_var: GpuTensor,
    dweight: GpuTensor,
    dbias: GpuTensor,
}

/// One recorded dispatch: kernel, bind group, workgroup count.
struct Pass<'k> {
    kernel: KernelRef<'k>,
    group: wgpu::BindGroup,
    workgroups: u32,
    /// Byte offset and size of binding 1.
    span: (u64, u64),
}

/// A dispatch of the last call a layer recorded
/// ([`GpuBatchNorm::last_dispatches`]): what ran, on what grid, over which
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuDispatch {
    /// The shader: its file name under `shaders/`, then `_gated` or
    /// `_in_place` for the variants of a fused backward and `_f16` or
    /// `_f16_packed` for f16 storage ([`crate::shaders::Shader::name`]).
    pub kernel: &'static str,
    /// Workgroups along x and y (a grid folds onto y past
    /// `max_compute_workgroups_per_dimension` or the cap of
    /// [`GpuBatchNorm::set_max_workgroups_per_dim`]).
    pub grid: [u32; 2],
    /// Byte offset and size of the dispatch's binding 1 in its buffer: `x`
    /// (or the chunk of `x` bound) for the passes that walk the tensors, the
    /// partial statistics or the state for the per-channel passes.
    pub binding1: (u64, u64),
}

/// A BatchNorm layer whose parameters, running statistics and gradients live
/// on a GPU, for recording into an app's command encoders.
///
/// Every operation is recorded by a `record_*` method into a
/// `wgpu::CommandEncoder`: nothing is submitted and nothing waits, so many
/// layers and many calls go into one submission. After the first call with a
/// given set of buffers and shape, recording allocates no buffer and creates
/// no bind group or pipeline ([`GpuBatchNorm::resource_counts`] shows it).
/// The `run_*` methods are the same recordings run through
/// [`GpuContext::run`]: one submit, a wait, results returned.
///
/// What holds:
/// - A recorded call checks everything it can (devices, shapes, layouts,
///   dtypes, saved statistics, buffers shared between inputs and outputs)
///   before it records anything; on `Err` the encoder and the layer are
///   unchanged.
/// - State lives on the device and changes when the commands run, in queue
///   order, as on CUDA: a recorded training forward moves the running
///   statistics and `num_batches_tracked` when it executes, so the same layer
///   recorded several times in one encoder gives exactly the results of
///   separate calls. Reads (`state`, `num_batches_tracked`) see what has run.
/// - A blocking `run_*` call that fails changes nothing: a call refused while
///   recording records nothing, and a submit that wgpu rejects runs nothing.
/// - `weight`, `bias`, `running_mean`, `running_var`, `dweight` and `dbias`
///   are tensors on the device ([`GpuBatchNorm::weight`], ...), so an
///   optimizer written in WGSL updates `weight` in place.
///
/// Each pass is recorded by the method named after its shader
/// (`stats_partial`, `stats_finalize`, `normalize`, `eval_coeffs`,
/// `backward_partial`, `backward_finalize`, `backward_dx`), beside the
/// function of the same name in [`crate::reference`]. The `_fused` methods
/// (`record_forward_train_fused`, `record_backward_fused`, ...) record
/// `y = act(BN(x) + z)` and its backward on the same passes.
///
/// ```no_run
/// use ndarray::{Array, IxDyn};
/// use wgpu_batchnorm::{BatchNormConfig, GpuBatchNorm, GpuContext, GpuTensor};
/// let ctx = GpuContext::new()?;
/// let mut bn = GpuBatchNorm::new(&ctx, BatchNormConfig::new(3))?;
/// let x = Array::from_shape_fn(IxDyn(&[4, 3, 8, 8]), |i| (i[0] * 7 + i[1] * 3 + i[2] + i[3]) as f32);
/// let x = GpuTensor::from_array(&ctx, x.view(), bn.config().layout)?;
/// let fwd = bn.run_forward_train(&x)?;                     // stays on the GPU
/// let grads = bn.run_backward(&x, &fwd.y, &fwd.saved)?;   // fwd.y as the upstream gradient, for show
/// let dx = grads.dx.to_array()?;                          // read back when needed
/// assert_eq!(dx.shape(), &[4, 3, 8, 8]);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct GpuBatchNorm {
    id: u64,
    ctx: GpuContext,
    config: BatchNormConfig,
    /// Elements between the sections of `state`.
    stride: usize,
    /// weight, bias, running_mean, running_var, dweight, dbias, counter (see [`section`]).
    state: wgpu::Buffer,
    views: Views,
    /// Per-channel coefficients of the elementwise passes, rewritten by every call.
    coef: wgpu::Buffer,
    /// Partial reductions per (channel, slice).
    scratch: wgpu::Buffer,
    scratch_bytes: u64,
    cache: Cache,
    slice_len: Option<u32>,
    /// How the device likes its reductions.
    fill: Fill,
    /// Cap on the bytes of one binding of the big tensors.
    max_binding: Option<u64>,
    max_per_dim: Option<u32>,
    /// Training forwards in one pass ([`GpuBatchNorm::set_single_pass`]).
    single_pass: Option<bool>,
    /// The single passes' merges in subgroups
    /// ([`GpuBatchNorm::set_subgroup_merges`]).
    subgroup_merges: Option<bool>,
    /// Storage type used for ndarray inputs of the [`crate::BatchNormBackend`] methods.
    storage: DType,
    /// f16 tensors go through the packed f16 kernels even where the device
    /// has `SHADER_F16` ([`GpuBatchNorm::set_packed_f16`]).
    packed_f16: Option<bool>,
    /// The dispatches of the last recorded call.
    dispatches: Vec<GpuDispatch>,
    /// What the last synchronized forward keeps for its backward.
    sync: Option<sync::SyncSaved>,
    /// Where forwards given no handle save their statistics.
    own_saved: Option<GpuSavedStats>,
    /// The statistics of the last forward through [`crate::BatchNormBackend`].
    last_saved: Option<GpuSavedStats>,
}

// Threads share a context and each run their own layers.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<GpuContext>();
    send_sync::<GpuBatchNorm>();
    send_sync::<GpuTensor>();
    send_sync::<GpuSavedStats>();
};

impl GpuBatchNorm {
    /// A layer on `ctx` in PyTorch's initial state.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::TooLarge`] when the
    /// per-channel buffers pass the device limits; [`Error::Wgpu`] when the
    /// device is out of memory.
    pub fn new(ctx: &GpuContext, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let c = config.num_features;
        let align = (ctx.limits().min_storage_buffer_offset_alignment as usize / 4).max(1);
        let stride = c.max(4).next_multiple_of(align);
        let state_bytes = (section::COUNT * stride * 4) as u64;
        ctx.check_storage_size("the layer's per-channel state", state_bytes)?;
        ctx.check_storage_size("per-channel coefficients", (c * 16) as u64)?;
        let state = ctx.storage_buffer("batchnorm.state", state_bytes)?;
        let view = |s: usize| {
            let offset = (s * stride * 4) as u64;
            GpuTensor::view(ctx, &state, offset, &[c], Layout::ChannelsFirst, DType::F32)
        };
        let views = Views {
            weight: view(section::WEIGHT),
            bias: view(section::BIAS),
            running_mean: view(section::RUNNING_MEAN),
            running_var: view(section::RUNNING_VAR),
            dweight: view(section::DWEIGHT),
            dbias: view(section::DBIAS),
        };
        let mut bn = Self {
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            stride,
            views,
            coef: ctx.storage_buffer("batchnorm.coef", (c * 16) as u64)?,
            scratch: ctx.storage_buffer("batchnorm.partials", 16)?,
            scratch_bytes: 16,
            cache: Cache::default(),
            slice_len: None,
            fill: Fill::of(ctx.adapter_info()),
            max_binding: None,
            max_per_dim: None,
            single_pass: None,
            subgroup_merges: None,
            storage: DType::F32,
            packed_f16: None,
            own_saved: None,
            last_saved: None,
            dispatches: Vec::new(),
            sync: None,
            state,
            ctx: ctx.clone(),
            config,
        };
        bn.own_saved = Some(GpuSavedStats::new(&bn)?);
        bn.cache.counts.buffers = 4;
        bn.set_state(&BatchNormState::new(&bn.config))?;
        Ok(bn)
    }

    /// Sets how many elements of a channel one reduction workgroup takes,
    /// rounded up to whole items (4 elements where the reduction reads vec4s
    /// of one channel). `None`: chosen from the shape and the adapter, so
    /// that the reductions run a few workgroups per processor of the device
    /// and each thread takes enough items (8 on a GPU, 128 on a CPU
    /// adapter). Smaller slices spread a channel over more workgroups.
    ///
    /// # Errors
    /// [`Error::Config`] for `Some(0)`.
    pub fn set_slice_len(&mut self, slice_len: Option<u32>) -> Result<()> {
        if slice_len == Some(0) {
            return Err(Error::Config("slice length must be at least 1".into()));
        }
        self.slice_len = slice_len;
        Ok(())
    }

    /// Caps the workgroups a dispatch puts on one grid dimension below the
    /// device's `max_compute_workgroups_per_dimension` (`None`: the device
    /// limit). Past the cap, dispatches fold onto a 2-D grid; a low cap lets
    /// small tensors exercise that path.
    ///
    /// # Errors
    /// [`Error::Config`] for `Some(0)`.
    pub fn set_max_workgroups_per_dim(&mut self, cap: Option<u32>) -> Result<()> {
        if cap == Some(0) {
            return Err(Error::Config(
                "workgroups per dimension must be at least 1".into(),
            ));
        }
        self.max_per_dim = cap;
        Ok(())
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The context (device) the layer runs on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Errors unless `t` lives on the layer's device and is in its layout.
    fn check_tensor(&self, what: &str, t: &GpuTensor) -> Result<()> {
        t.check_device(what, &self.ctx)?;
        validate::layout(what, self.config.layout, t.layout())
    }

    /// Errors unless the input `t` is like `x`: device, layout, shape and dtype.
    fn check_input_like(&self, what: &str, t: &GpuTensor, x: &GpuTensor) -> Result<()> {
        self.check_tensor(what, t)?;
        validate::same_shape(what, x.shape(), t.shape())?;
        validate::dtype(what, x.dtype(), t.dtype())
    }

    /// Errors unless the output `out` fits: device, layout, `dtype` and shape `dims`.
    fn check_output(
        &self,
        what: &str,
        out: &GpuTensor,
        dims: &[usize],
        dtype: DType,
    ) -> Result<()> {
        self.check_tensor(what, out)?;
        validate::dtype(what, dtype, out.dtype())?;
        validate::same_shape(what, dims, out.shape())
    }

    /// Errors when the tensors of a call share buffers that its dispatches
    /// cannot bind together: the written tensor `out` with any other, or any
    /// of them with the layer's state or the saved statistics.
    fn check_buffers(
        &self,
        out: (&str, &GpuTensor),
        inputs: &[(&str, &GpuTensor)],
        saved: &wgpu::Buffer,
    ) -> Result<()> {
        let alias = |what: &str, other: &str| {
            Err(Error::BufferAlias {
                what: what.into(),
                other: other.into(),
            })
        };
        for (what, t) in inputs.iter().chain([&out]) {
            if t.buffer() == &self.state {
                return alias(
                    what,
                    "the layer's state (parameters, statistics, gradients)",
                );
            }
            if t.buffer() == saved {
                return alias(what, "the saved statistics");
            }
        }
        for (what, t) in inputs {
            if t.buffer() == out.1.buffer() {
                return alias(out.0, what);
            }
        }
        Ok(())
    }

    /// The uniform block of `p`, and a partials buffer large enough for it.
    fn prepare(&mut self, p: &Params) -> Result<wgpu::Buffer> {
        // vec4 per (channel, slice): the statistics pass writes (mean, M2, K, 0)
        let bytes = u64::from(p.channels) * u64::from(p.slices) * 16;
        if bytes > self.scratch_bytes {
            self.ctx.check_storage_size("partial statistics", bytes)?;
            let old = std::mem::replace(
                &mut self.scratch,
                self.ctx.storage_buffer("batchnorm.partials", bytes)?,
            );
            self.scratch_bytes = bytes;
            self.cache.counts.buffers += 1;
            self.cache.forget_groups_of(&old);
        }
        self.cache.params(&self.ctx, p)
    }

    /// Workgroups per grid dimension: the device limit, or the cap below it.
    fn max_dim(&self) -> u32 {
        let limit = self.ctx.limits().max_compute_workgroups_per_dimension;
        self.max_per_dim.map_or(limit, |cap| cap.min(limit))
    }

    /// The bind group of `kernel` over `bindings`, from the cache.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `workgroups` do not fit the 2-D grid the
    /// dispatch folds them onto; [`Error::Wgpu`] when the bind group cannot be made.
    fn group<'k>(
        &mut self,
        kernel: impl Into<KernelRef<'k>>,
        bindings: &[wgpu::BufferBinding<'_>],
        workgroups: u32,
    ) -> Result<Pass<'k>> {
        let kernel = kernel.into();
        let limit = self.ctx.limits().max_compute_workgroups_per_dimension;
        if workgroups.div_ceil(self.max_dim()) > limit {
            return Err(Error::Unsupported {
                adapter: self.ctx.label(),
                what: format!(
                    "{} needs {workgroups} workgroups, more than a grid of {} x {limit} holds (see set_max_workgroups_per_dim)",
                    kernel.label,
                    self.max_dim()
                ),
            });
        }
        let group = self.cache.group(&self.ctx, &kernel, bindings)?;
        let b = &bindings[1];
        let size = b.size.map_or(b.buffer.size() - b.offset, |s| s.get());
        Ok(Pass {
            kernel,
            group,
            workgroups,
            span: (b.offset, size),
        })
    }

    /// Records `passes` into one compute pass, in order, and notes them for
    /// [`GpuBatchNorm::last_dispatches`].
    fn record(&mut self, enc: &mut wgpu::CommandEncoder, label: &str, passes: &[Pass<'_>]) {
        let max_dim = self.max_dim();
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        self.dispatches.clear();
        for p in passes {
            let grid = kernels::dispatch(&mut cpass, &p.kernel, &p.group, p.workgroups, max_dim);
            self.dispatches.push(GpuDispatch {
                kernel: p.kernel.name,
                grid,
                binding1: p.span,
            });
        }
    }

    /// The dispatches of the last call this layer recorded, in order: which
    /// kernels ran on what grids over which bytes. Tests and benchmarks use
    /// it to see the slices, folded grids and chunked bindings a shape gets.
    pub fn last_dispatches(&self) -> &[GpuDispatch] {
        &self.dispatches
    }

    /// A binding of the whole `buffer`.
    fn whole(buffer: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
        buffer.as_entire_buffer_binding()
    }
}

impl GpuSavedStats {
    /// An empty handle for forwards of `layer` (`4 * C` floats on its device).
    ///
    /// # Errors
    /// [`Error::Wgpu`] when the device is out of memory.
    pub fn new(layer: &GpuBatchNorm) -> Result<Self> {
        Self::empty(&layer.ctx, layer.id, layer.config.num_features)
    }
}

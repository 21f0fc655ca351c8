//! BatchNorm on a wgpu device: the layer, its buffers and state. The
//! operations are in `forward.rs` and `backward.rs`, one method per pass.

mod backend;
mod backward;
mod forward;

use super::context::GpuContext;
use super::kernels::{self, ElementKernels, Kernel, Params};
use super::tensor::GpuTensor;
use crate::config::BatchNormConfig;
use crate::error::{Error, Result};
use crate::layout::DType;
use crate::shaders::WG;
use crate::shape::ChannelWalk;
use crate::state::{BatchNormState, SavedStats};
use crate::validate;
use wgpu::util::DeviceExt;

/// Smallest slice of a channel one reduction workgroup takes by default.
const MIN_SLICE_LEN: u32 = 4096;
/// Most slices a channel is split into by default.
const MAX_SLICES: u32 = 256;

/// Gradients of a GPU backward pass, left on the device.
#[derive(Debug, Clone)]
pub struct GpuGradients {
    /// Gradient with respect to the input.
    pub dx: GpuTensor,
    /// Gradient with respect to `weight`, shape `(C,)` (affine only).
    pub dweight: Option<GpuTensor>,
    /// Gradient with respect to `bias`, shape `(C,)` (affine only).
    pub dbias: Option<GpuTensor>,
}

/// A BatchNorm layer whose parameters, running statistics and saved batch
/// statistics live on a GPU.
///
/// All passes of one call go into one command encoder and one submit; the
/// pipelines come from the [`GpuContext`], and the scratch buffers are kept
/// and reused across calls. Each pass is recorded by the method named after
/// its shader (`stats_partial`, `stats_finalize`, `normalize`, `eval_coeffs`,
/// `backward_partial`, `backward_finalize`, `backward_dx`), beside the
/// function of the same name in [`crate::reference`].
///
/// ```no_run
/// use ndarray::{Array, IxDyn};
/// use wgpu_batchnorm::{BatchNormConfig, GpuBatchNorm, GpuContext, GpuTensor, Mode};
/// let ctx = GpuContext::new()?;
/// let mut bn = GpuBatchNorm::new(&ctx, BatchNormConfig::new(3))?;
/// let x = Array::from_shape_fn(IxDyn(&[4, 3, 8, 8]), |i| (i[0] * 7 + i[1] * 3 + i[2] + i[3]) as f32);
/// let x = GpuTensor::from_array(&ctx, x.view(), bn.config().layout)?;
/// let y = bn.forward_train(&x)?;               // stays on the GPU
/// let grads = bn.backward(&x, &y, Mode::Train)?; // y as the upstream gradient, for show
/// let dx = grads.dx.to_array()?;               // read back when needed
/// assert_eq!(dx.shape(), &[4, 3, 8, 8]);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct GpuBatchNorm {
    ctx: GpuContext,
    config: BatchNormConfig,
    params: wgpu::Buffer,
    /// (weight, bias) per channel; (1, 0) without affine.
    wb: wgpu::Buffer,
    /// (running_mean, running_var) per channel, double-buffered: a training
    /// forward reads `running[cur]` and writes the other one, and `cur` flips
    /// only when the whole call succeeded.
    running: [wgpu::Buffer; 2],
    cur: usize,
    num_batches_tracked: u64,
    /// (mean, invstd) of the last forward with batch statistics.
    saved: wgpu::Buffer,
    saved_dims: Option<Vec<usize>>,
    coef: wgpu::Buffer,
    eval_coef: wgpu::Buffer,
    eval_coef_fresh: bool,
    dx_coef: wgpu::Buffer,
    scratch: wgpu::Buffer,
    scratch_bytes: u64,
    slice_len: Option<u32>,
    max_per_dim: Option<u32>,
    /// Storage type used for ndarray inputs of the [`crate::BatchNormBackend`] methods.
    storage: DType,
}

fn interleave(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).flat_map(|(&u, &v)| [u, v]).collect()
}

fn split(v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    v.chunks_exact(2).map(|p| (p[0], p[1])).unzip()
}

impl GpuBatchNorm {
    /// A layer on `ctx` in PyTorch's initial state.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; [`Error::TooLarge`] when the
    /// per-channel buffers pass the device limits.
    pub fn new(ctx: &GpuContext, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let c = config.num_features;
        ctx.check_storage_size("per-channel coefficients", (c * 16) as u64)?;
        let device = ctx.device();
        let state = BatchNormState::new(&config);
        let ones = vec![1.0f32; c];
        let zeros = vec![0.0f32; c];
        let wb = interleave(&ones, &zeros);
        let running = interleave(&zeros, &ones);
        let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("batchnorm.params"),
            contents: bytemuck::bytes_of(&Params::default()),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });
        let per_channel =
            |label: &str, floats: usize| ctx.storage_buffer(label, (c * floats * 4) as u64);
        let mut bn = Self {
            params,
            wb: ctx.storage_buffer_init("batchnorm.weight_bias", bytemuck::cast_slice(&wb)),
            running: [
                ctx.storage_buffer_init("batchnorm.running.0", bytemuck::cast_slice(&running)),
                ctx.storage_buffer_init("batchnorm.running.1", bytemuck::cast_slice(&running)),
            ],
            cur: 0,
            num_batches_tracked: 0,
            saved: per_channel("batchnorm.saved", 2),
            saved_dims: None,
            coef: per_channel("batchnorm.coef", 4),
            eval_coef: per_channel("batchnorm.eval_coef", 4),
            eval_coef_fresh: false,
            dx_coef: per_channel("batchnorm.dx_coef", 4),
            scratch: ctx.storage_buffer("batchnorm.partials", 16),
            scratch_bytes: 16,
            slice_len: None,
            max_per_dim: None,
            storage: DType::F32,
            ctx: ctx.clone(),
            config,
        };
        bn.set_state(&state)?;
        Ok(bn)
    }

    /// Sets how many elements of a channel one reduction workgroup takes
    /// (`None`: chosen from the shape, at least 4096 and at most 256 slices a
    /// channel). Smaller slices spread a channel over more workgroups.
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

    /// The element kernels for tensors stored as `dtype`.
    fn elements(&self, dtype: DType) -> Result<&ElementKernels> {
        let k = self.ctx.kernels();
        match dtype {
            DType::F32 => Ok(&k.f32),
            DType::F16 => k.f16.as_ref().ok_or_else(|| Error::Unsupported {
                adapter: self.ctx.label(),
                what: "f16 storage needs the SHADER_F16 feature, which this adapter lacks".into(),
            }),
        }
    }

    /// Sets the storage type that the [`crate::BatchNormBackend`] methods round their
    /// ndarray inputs to before computing (outputs come back widened to f32).
    /// Device-resident calls take the type of the tensors they are given.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for f16 on an adapter without `SHADER_F16`.
    pub fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        self.elements(dtype)?;
        self.storage = dtype;
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

    /// Training steps counted so far (`None` without tracked statistics).
    pub fn num_batches_tracked(&self) -> Option<u64> {
        self.config
            .track_running_stats
            .then_some(self.num_batches_tracked)
    }

    /// Errors unless `t` lives on the layer's device and is in its layout.
    fn check_tensor(&self, what: &str, t: &GpuTensor) -> Result<()> {
        t.check_device(what, &self.ctx)?;
        validate::layout(what, self.config.layout, t.layout())
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

    /// Parameters of one call on `walk`.
    fn params(&self, walk: &ChannelWalk, flags: u32, momentum: f64) -> Params {
        let m = walk.per_channel() as u32;
        let slice_len = self
            .slice_len
            .unwrap_or_else(|| MIN_SLICE_LEN.max(m.div_ceil(MAX_SLICES)))
            .min(m);
        Params {
            channels: walk.channels as u32,
            outer: walk.outer as u32,
            inner: walk.inner as u32,
            total: walk.len() as u32,
            slices: m.div_ceil(slice_len),
            slice_len,
            per_channel: m,
            flags,
            eps: self.config.eps as f32,
            momentum: momentum as f32,
            unbias: if m > 1 {
                m as f32 / (m - 1) as f32
            } else {
                0.0
            },
            inv_m: 1.0 / m as f32,
        }
    }

    /// Writes `p` and grows the partials buffer for it.
    fn prepare(&mut self, p: &Params) -> Result<()> {
        let bytes = u64::from(p.channels) * u64::from(p.slices) * 8;
        if bytes > self.scratch_bytes {
            self.ctx.check_storage_size("partial statistics", bytes)?;
            self.scratch = self.ctx.storage_buffer("batchnorm.partials", bytes);
            self.scratch_bytes = bytes;
        }
        self.ctx
            .queue()
            .write_buffer(&self.params, 0, bytemuck::bytes_of(p));
        Ok(())
    }

    fn max_dim(&self) -> u32 {
        let limit = self.ctx.limits().max_compute_workgroups_per_dimension;
        self.max_per_dim.map_or(limit, |cap| cap.min(limit))
    }

    fn pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        k: &Kernel,
        buffers: &[&wgpu::Buffer],
        wgs: u32,
    ) {
        let bg = k.bind(self.ctx.device(), buffers);
        kernels::dispatch(enc, k, &bg, wgs, self.max_dim());
    }

    fn elementwise_wgs(p: &Params) -> (bool, u32) {
        let vec4 = p.total.is_multiple_of(4);
        let items = if vec4 { p.total / 4 } else { p.total };
        (vec4, items.div_ceil(WG))
    }

    /// Batch statistics of the last forward that computed them.
    ///
    /// # Errors
    /// Device errors.
    pub fn saved_stats(&self) -> Result<Option<SavedStats>> {
        if self.saved_dims.is_none() {
            return Ok(None);
        }
        let (mean, invstd) = split(
            &self
                .ctx
                .read_f32(&self.saved, self.config.num_features * 2)?,
        );
        Ok(Some(SavedStats { mean, invstd }))
    }

    /// Parameters and running statistics, read back from the device.
    ///
    /// # Errors
    /// Device errors.
    pub fn state(&self) -> Result<BatchNormState> {
        let c = self.config.num_features;
        let (w, b) = split(&self.ctx.read_f32(&self.wb, c * 2)?);
        let (rm, rv) = split(&self.ctx.read_f32(&self.running[self.cur], c * 2)?);
        let (affine, track) = (self.config.affine, self.config.track_running_stats);
        Ok(BatchNormState {
            weight: affine.then_some(w),
            bias: affine.then_some(b),
            running_mean: track.then_some(rm),
            running_var: track.then_some(rv),
            num_batches_tracked: track.then_some(self.num_batches_tracked),
        })
    }

    /// Replaces parameters and running statistics.
    ///
    /// # Errors
    /// [`Error::ParameterLength`], [`Error::MissingParameter`].
    pub fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        state.validate(&self.config)?;
        let c = self.config.num_features;
        let ones = vec![1.0f32; c];
        let zeros = vec![0.0f32; c];
        let q = self.ctx.queue();
        let wb = interleave(
            state.weight.as_deref().unwrap_or(&ones),
            state.bias.as_deref().unwrap_or(&zeros),
        );
        q.write_buffer(&self.wb, 0, bytemuck::cast_slice(&wb));
        let running = interleave(
            state.running_mean.as_deref().unwrap_or(&zeros),
            state.running_var.as_deref().unwrap_or(&ones),
        );
        q.write_buffer(&self.running[self.cur], 0, bytemuck::cast_slice(&running));
        self.num_batches_tracked = state.num_batches_tracked.unwrap_or(0);
        self.eval_coef_fresh = false;
        Ok(())
    }
}

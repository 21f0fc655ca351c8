//! Training and evaluation forward: the passes `stats_partial`,
//! `stats_finalize`, `eval_coeffs` and `normalize`, and the operations
//! built from them.

use super::GpuBatchNorm;
use crate::config::Mode;
use crate::error::Result;
use crate::gpu::kernels::{ElementKernels, Params};
use crate::gpu::tensor::GpuTensor;
use crate::shaders::{FLAG_UPDATE_RUNNING, WG_CHANNEL};
use crate::validate;

impl GpuBatchNorm {
    /// Training statistics, stage 1 (`shaders/stats_partial.wgsl`,
    /// [`crate::reference::stats_partial`]): Welford `(mean, M2)` of each
    /// slice of each channel of `x` into the partials buffer.
    fn stats_partial(
        &self,
        enc: &mut wgpu::CommandEncoder,
        e: &ElementKernels,
        p: &Params,
        x: &GpuTensor,
    ) {
        let buffers = [&self.params, &x.buffer, &self.scratch];
        self.pass(enc, &e.stats_partial, &buffers, p.channels * p.slices);
    }

    /// Training statistics, stage 2 (`shaders/stats_finalize.wgsl`,
    /// [`crate::reference::stats_finalize`]): per channel, Chan-merges the
    /// slices into the saved `(mean, invstd)` and the coefficients of
    /// [`GpuBatchNorm::normalize`], and (with `FLAG_UPDATE_RUNNING`) writes the
    /// updated running statistics into the running buffer not in use.
    fn stats_finalize(&self, enc: &mut wgpu::CommandEncoder, p: &Params) {
        let (running_in, running_out) = (&self.running[self.cur], &self.running[1 - self.cur]);
        let buffers = [
            &self.params,
            &self.scratch,
            &self.wb,
            running_in,
            running_out,
            &self.saved,
            &self.coef,
        ];
        let k = &self.ctx.kernels().stats_finalize;
        self.pass(enc, k, &buffers, p.channels.div_ceil(WG_CHANNEL));
    }

    /// Evaluation coefficients (`shaders/eval_coeffs.wgsl`,
    /// [`crate::reference::eval_coeffs`]) from the running statistics.
    fn eval_coeffs(&self, enc: &mut wgpu::CommandEncoder, p: &Params) {
        let buffers = [
            &self.params,
            &self.wb,
            &self.running[self.cur],
            &self.eval_coef,
        ];
        let k = &self.ctx.kernels().eval_coeffs;
        self.pass(enc, k, &buffers, p.channels.div_ceil(WG_CHANNEL));
    }

    /// The elementwise pass (`shaders/normalize.wgsl`, or
    /// `normalize_vec4.wgsl` when the element count is a multiple of 4;
    /// [`crate::reference::normalize`]): `y = (x - center) * scale + shift`
    /// with the per-channel coefficients in `coef`.
    fn normalize(
        &self,
        enc: &mut wgpu::CommandEncoder,
        e: &ElementKernels,
        p: &Params,
        (x, coef, y): (&GpuTensor, &wgpu::Buffer, &GpuTensor),
    ) {
        let (vec4, wgs) = Self::elementwise_wgs(p);
        let buffers = [&self.params, &x.buffer, coef, &y.buffer];
        self.pass(enc, e.normalize(vec4), &buffers, wgs);
    }

    /// Batch statistics forward into `y`; `update` also moves the running statistics.
    fn batch_forward(&mut self, x: &GpuTensor, y: &GpuTensor, update: bool) -> Result<()> {
        self.check_tensor("x", x)?;
        let walk = validate::input(&self.config, x.shape(), true)?;
        self.check_output("y", y, &walk.dims, x.dtype())?;
        let update = update && self.config.track_running_stats;
        let momentum = self.config.momentum_factor(self.num_batches_tracked + 1);
        let flags = if update { FLAG_UPDATE_RUNNING } else { 0 };
        let p = self.params(&walk, flags, momentum);
        self.prepare(&p)?;
        let e = self.elements(x.dtype())?;
        self.ctx.submit("BatchNorm training forward", |enc| {
            self.stats_partial(enc, e, &p, x);
            self.stats_finalize(enc, &p);
            self.normalize(enc, e, &p, (x, &self.coef, y));
        })?;
        if update {
            self.cur = 1 - self.cur;
            self.num_batches_tracked += 1;
            self.eval_coef_fresh = false;
        }
        self.saved_dims = Some(walk.dims);
        Ok(())
    }

    /// Training forward: `y` from batch statistics, which are kept for
    /// [`GpuBatchNorm::backward`]; updates the running statistics when tracked.
    ///
    /// ```text
    /// y = (x - mean) / sqrt(var + eps) * weight + bias      (var biased)
    /// running_mean = (1-m) running_mean + m mean
    /// running_var  = (1-m) running_var  + m var M/(M-1)
    /// ```
    ///
    /// # Errors
    /// [`crate::Error::DeviceMismatch`], [`crate::Error::LayoutMismatch`],
    /// [`crate::Error::Rank`], [`crate::Error::ChannelMismatch`],
    /// [`crate::Error::Empty`], [`crate::Error::SingleValuePerChannel`],
    /// [`crate::Error::TooLarge`], [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`]. On error the layer is unchanged.
    pub fn forward_train(&mut self, x: &GpuTensor) -> Result<GpuTensor> {
        self.check_tensor("x", x)?;
        let walk = validate::input(&self.config, x.shape(), true)?;
        let y = GpuTensor::uninit_as(&self.ctx, &walk.dims, walk.layout, x.dtype())?;
        self.batch_forward(x, &y, true)?;
        Ok(y)
    }

    /// [`GpuBatchNorm::forward_train`] into an existing tensor of the same shape.
    ///
    /// # Errors
    /// As `forward_train`, and [`crate::Error::ShapeMismatch`] for `y`.
    pub fn forward_train_into(&mut self, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        self.batch_forward(x, y, true)
    }

    /// Evaluation forward: `y` from the running statistics, or from batch
    /// statistics (kept for backward, running statistics untouched) when they
    /// are not tracked.
    ///
    /// ```text
    /// y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
    /// ```
    ///
    /// # Errors
    /// As [`GpuBatchNorm::forward_train`]; one value per channel is an error only
    /// without tracked statistics.
    pub fn forward_eval(&mut self, x: &GpuTensor) -> Result<GpuTensor> {
        self.check_tensor("x", x)?;
        let batch = validate::uses_batch_stats(&self.config, Mode::Eval);
        let walk = validate::input(&self.config, x.shape(), batch)?;
        let y = GpuTensor::uninit_as(&self.ctx, &walk.dims, walk.layout, x.dtype())?;
        self.forward_eval_into(x, &y)?;
        Ok(y)
    }

    /// [`GpuBatchNorm::forward_eval`] into an existing tensor of the same shape.
    ///
    /// # Errors
    /// As `forward_eval`, and [`crate::Error::ShapeMismatch`] for `y`.
    pub fn forward_eval_into(&mut self, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        if !self.config.track_running_stats {
            return self.batch_forward(x, y, false);
        }
        self.check_tensor("x", x)?;
        let walk = validate::input(&self.config, x.shape(), false)?;
        self.check_output("y", y, &walk.dims, x.dtype())?;
        let p = self.params(&walk, 0, 0.0);
        self.prepare(&p)?;
        let e = self.elements(x.dtype())?;
        let fresh = self.eval_coef_fresh;
        self.ctx.submit("BatchNorm evaluation forward", |enc| {
            if !fresh {
                self.eval_coeffs(enc, &p);
            }
            self.normalize(enc, e, &p, (x, &self.eval_coef, y));
        })?;
        self.eval_coef_fresh = true;
        Ok(())
    }
}

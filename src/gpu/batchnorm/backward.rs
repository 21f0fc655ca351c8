//! Backward: the passes `backward_partial`, `backward_finalize` and
//! `backward_dx`, and the operation built from them.

use super::{GpuBatchNorm, GpuGradients};
use crate::config::Mode;
use crate::error::Result;
use crate::gpu::kernels::{ElementKernels, Params};
use crate::gpu::tensor::GpuTensor;
use crate::layout::DType;
use crate::shaders::{FLAG_BATCH_STATS, WG_CHANNEL};
use crate::validate;

impl GpuBatchNorm {
    /// Backward, stage 1 (`shaders/backward_partial.wgsl`,
    /// [`crate::reference::backward_partial`]): `S1 = sum(dy)` and
    /// `S2 = sum(dy * (x - mean))` of each slice of each channel into the
    /// partials buffer; `stats` holds the mean.
    fn backward_partial(
        &self,
        enc: &mut wgpu::CommandEncoder,
        e: &ElementKernels,
        p: &Params,
        (x, dy, stats): (&GpuTensor, &GpuTensor, &wgpu::Buffer),
    ) {
        let buffers = [&self.params, &x.buffer, &dy.buffer, stats, &self.scratch];
        self.pass(enc, &e.backward_partial, &buffers, p.channels * p.slices);
    }

    /// Backward, stage 2 (`shaders/backward_finalize.wgsl`,
    /// [`crate::reference::backward_finalize`]): per channel, sums the slices
    /// into `dweight`, `dbias` and the coefficients of
    /// [`GpuBatchNorm::backward_dx`].
    fn backward_finalize(
        &self,
        enc: &mut wgpu::CommandEncoder,
        p: &Params,
        (stats, dweight, dbias): (&wgpu::Buffer, &GpuTensor, &GpuTensor),
    ) {
        let buffers = [
            &self.params,
            &self.scratch,
            stats,
            &self.wb,
            &dweight.buffer,
            &dbias.buffer,
            &self.dx_coef,
        ];
        let k = &self.ctx.kernels().backward_finalize;
        self.pass(enc, k, &buffers, p.channels.div_ceil(WG_CHANNEL));
    }

    /// Backward, stage 3 (`shaders/backward_dx.wgsl`, or
    /// `backward_dx_vec4.wgsl` when the element count is a multiple of 4;
    /// [`crate::reference::backward_dx`]): `dx = a*dy + b*(x - mean) + c`.
    fn backward_dx(
        &self,
        enc: &mut wgpu::CommandEncoder,
        e: &ElementKernels,
        p: &Params,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
    ) {
        let (vec4, wgs) = Self::elementwise_wgs(p);
        let buffers = [
            &self.params,
            &x.buffer,
            &dy.buffer,
            &self.dx_coef,
            &dx.buffer,
        ];
        self.pass(enc, e.backward_dx(vec4), &buffers, wgs);
    }

    /// Backward of the forward in `mode`: `dx`, and `dweight`, `dbias` when affine.
    ///
    /// ```text
    /// batch statistics (Mode::Train, or Mode::Eval without tracking):
    ///   dbias = sum(dy), dweight = sum(dy (x - mean)) invstd
    ///   dx = weight invstd (dy - sum(dy)/M - (x - mean) invstd^2 sum(dy (x - mean))/M)
    /// running statistics (Mode::Eval with tracking):
    ///   dx = dy weight / sqrt(running_var + eps)
    /// ```
    ///
    /// # Errors
    /// As [`GpuBatchNorm::forward_train`], [`crate::Error::ShapeMismatch`] when
    /// `dy` differs from `x`, [`crate::Error::NoSavedStatistics`] when batch
    /// statistics of this shape were not computed by a forward first.
    pub fn backward(&mut self, x: &GpuTensor, dy: &GpuTensor, mode: Mode) -> Result<GpuGradients> {
        self.check_tensor("x", x)?;
        let walk = validate::input(&self.config, x.shape(), false)?;
        let dx = GpuTensor::uninit_as(&self.ctx, &walk.dims, walk.layout, x.dtype())?;
        let c = [self.config.num_features];
        let dweight = GpuTensor::uninit(&self.ctx, &c, self.config.layout)?;
        let dbias = GpuTensor::uninit(&self.ctx, &c, self.config.layout)?;
        self.backward_into(x, dy, mode, &dx, &dweight, &dbias)?;
        let affine = self.config.affine;
        Ok(GpuGradients {
            dx,
            dweight: affine.then_some(dweight),
            dbias: affine.then_some(dbias),
        })
    }

    /// [`GpuBatchNorm::backward`] into existing tensors: `dx` of the shape of `x`,
    /// `dweight` and `dbias` of shape `(C,)` (written also without affine).
    ///
    /// # Errors
    /// As `backward`, and [`crate::Error::ShapeMismatch`] for an output.
    pub fn backward_into(
        &mut self,
        x: &GpuTensor,
        dy: &GpuTensor,
        mode: Mode,
        dx: &GpuTensor,
        dweight: &GpuTensor,
        dbias: &GpuTensor,
    ) -> Result<()> {
        self.check_tensor("x", x)?;
        self.check_tensor("dy", dy)?;
        let walk = validate::backward_input(&self.config, x.shape(), dy.shape())?;
        self.check_output("dx", dx, &walk.dims, x.dtype())?;
        validate::dtype("dy", x.dtype(), dy.dtype())?;
        let c = [self.config.num_features];
        for (what, t) in [("dweight", dweight), ("dbias", dbias)] {
            t.check_device(what, &self.ctx)?;
            validate::dtype(what, DType::F32, t.dtype())?;
            validate::same_shape(what, &c, t.shape())?;
        }
        let batch = validate::uses_batch_stats(&self.config, mode);
        if batch {
            validate::saved_shape(self.saved_dims.as_deref(), &walk.dims)?;
        }
        let flags = if batch { FLAG_BATCH_STATS } else { 0 };
        let p = self.params(&walk, flags, 0.0);
        self.prepare(&p)?;
        let e = self.elements(x.dtype())?;
        let stats = if batch {
            &self.saved
        } else {
            &self.running[self.cur]
        };
        self.ctx.submit("BatchNorm backward", |enc| {
            self.backward_partial(enc, e, &p, (x, dy, stats));
            self.backward_finalize(enc, &p, (stats, dweight, dbias));
            self.backward_dx(enc, e, &p, (x, dy, dx));
        })
    }
}

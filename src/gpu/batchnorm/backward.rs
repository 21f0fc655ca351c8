//! Backward: the passes `backward_partial`, `backward_finalize` and
//! `backward_dx`, and the recorded operation built from them.

use super::plan::Chunk;
use super::{GpuBatchNorm, GpuSavedStats, Pass, elements};
use crate::error::Result;
use crate::gpu::kernels::{ElementKernels, Kernel, Params};
use crate::gpu::tensor::GpuTensor;
use crate::shaders::{FLAG_BATCH_STATS, WG_CHANNEL};
use crate::shape::ChannelWalk;
use crate::validate;

impl GpuBatchNorm {
    /// Backward, stage 1 (`shaders/backward_partial.wgsl`, or
    /// `backward_partial_vec4.wgsl` when the reduction reads vec4s; on the
    /// grid of [`super::grid::ReduceGrid`]; [`crate::reference::backward_partial`]): `S1 = sum(dy)` and
    /// `S2 = sum(dy * (x - mean))` of each slice of each channel into the
    /// partials buffer, with the mean the forward saved.
    pub(super) fn backward_partial<'k>(
        &mut self,
        e: &'k ElementKernels,
        chunk: &Chunk,
        (x, dy, saved): (&GpuTensor, &GpuTensor, &wgpu::Buffer),
    ) -> Result<Pass<'k>> {
        let (vec4, wgs) = chunk.reduce;
        let params = self.cache.params(&self.ctx, &chunk.p)?;
        let scratch = self.scratch.clone();
        let bindings = [
            Self::whole(&params),
            x.range_binding(chunk.first, chunk.len),
            dy.range_binding(chunk.first, chunk.len),
            Self::whole(saved),
            Self::whole(&scratch),
        ];
        self.group(e.backward_partial(vec4), &bindings, wgs)
    }

    /// Backward, stage 2 (`shaders/backward_finalize.wgsl`,
    /// [`crate::reference::backward_finalize`]): per channel, sums the slices
    /// into the layer's `dweight`, `dbias` and the coefficients of
    /// [`GpuBatchNorm::backward_dx`].
    fn backward_finalize<'k>(
        &mut self,
        k: &'k Kernel,
        (params, p): (&wgpu::Buffer, &Params),
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        let (scratch, state, coef) = (self.scratch.clone(), self.state.clone(), self.coef.clone());
        let bindings = [
            Self::whole(params),
            Self::whole(&scratch),
            Self::whole(saved),
            Self::whole(&state),
            Self::whole(&coef),
        ];
        self.group(k, &bindings, p.channels.div_ceil(WG_CHANNEL))
    }

    /// Backward, stage 3 (`shaders/backward_dx.wgsl`, or
    /// `backward_dx_vec4.wgsl` when a row of `C * inner` elements is a
    /// multiple of 4; on the grid of [`super::grid::ElementGrid`];
    /// [`crate::reference::backward_dx`]): `dx = a*dy + b*(x - mean) + c`;
    /// threads whose channels all have `b = 0` (running statistics) leave `x` unread.
    pub(super) fn backward_dx<'k>(
        &mut self,
        e: &'k ElementKernels,
        chunk: &Chunk,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
    ) -> Result<Pass<'k>> {
        let (vec4, wgs) = chunk.elements;
        let params = self.cache.params(&self.ctx, &chunk.p)?;
        let coef = self.coef.clone();
        let (first, len) = (chunk.first, chunk.len);
        let bindings = [
            Self::whole(&params),
            x.range_binding(first, len),
            dy.range_binding(first, len),
            Self::whole(&coef),
            dx.range_binding(first, len),
        ];
        self.group(e.backward_dx(vec4), &bindings, wgs)
    }

    /// Checks the tensors of a backward; the walk of `x`.
    fn check_backward(
        &self,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        saved: &wgpu::Buffer,
    ) -> Result<ChannelWalk> {
        self.check_tensor("x", x)?;
        self.check_tensor("dy", dy)?;
        let walk = validate::backward_input(&self.config, x.shape(), dy.shape())?;
        validate::dtype("dy", x.dtype(), dy.dtype())?;
        self.check_output("dx", dx, &walk.dims, x.dtype())?;
        elements(&self.ctx, x.dtype())?;
        self.check_buffers(("dx", dx), &[("x", x), ("dy", dy)], saved)?;
        Ok(walk)
    }

    /// Records the passes of a backward whose forward saved `saved`.
    fn record_backward_passes(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        walk: &ChannelWalk,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        (saved, batch): (&wgpu::Buffer, bool),
        before: Option<Pass<'_>>,
    ) -> Result<()> {
        let ctx = self.ctx.clone();
        let e = elements(&ctx, x.dtype())?;
        let flags = if batch { FLAG_BATCH_STATS } else { 0 };
        let plan = self.plan(walk, x.dtype(), flags)?;
        let p = plan.whole;
        let params = self.prepare(&p)?;
        let k = &ctx.kernels().backward_finalize;
        let mut passes: Vec<Pass<'_>> = before.into_iter().collect();
        if batch || self.config.affine {
            for chunk in &plan.chunks {
                passes.push(self.backward_partial(e, chunk, (x, dy, saved))?);
            }
            passes.push(self.backward_finalize(k, (&params, &p), saved)?);
        } else {
            // Running statistics and no dweight: dx = dy * weight * invstd
            // needs no sums, so the finalize pass runs over zero slices.
            let p0 = Params { slices: 0, ..p };
            let params0 = self.prepare(&p0)?;
            passes.push(self.backward_finalize(k, (&params0, &p0), saved)?);
        }
        for chunk in &plan.chunks {
            passes.push(self.backward_dx(e, chunk, (x, dy, dx))?);
        }
        self.record(enc, "batchnorm.backward", &passes);
        Ok(())
    }

    /// Records the backward of the forward that wrote `saved`: `dx` into
    /// `dx`, and `dweight`, `dbias` into the layer's gradient tensors
    /// ([`GpuBatchNorm::dweight`], [`GpuBatchNorm::dbias`]), which each
    /// backward overwrites. Nothing is submitted.
    ///
    /// ```text
    /// batch statistics (a training forward, or evaluation without tracking):
    ///   dbias = sum(dy), dweight = sum(dy (x - mean)) invstd
    ///   dx = weight invstd (dy - sum(dy)/M - (x - mean) invstd^2 sum(dy (x - mean))/M)
    /// running statistics (an evaluation forward with tracking):
    ///   dx = dy weight / sqrt(running_var + eps)
    /// ```
    ///
    /// # Errors
    /// Checked before anything is recorded: as
    /// [`GpuBatchNorm::record_forward_train`] for `x` and `dx`,
    /// [`crate::Error::ShapeMismatch`] or [`crate::Error::DTypeMismatch`]
    /// when `dy` differs from `x`, [`crate::Error::NoSavedStatistics`] when no
    /// forward wrote `saved`, [`crate::Error::SavedStatsMismatch`] when it
    /// belongs to another layer or to a forward of another shape.
    pub fn record_backward(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        dy: &GpuTensor,
        saved: &GpuSavedStats,
        dx: &GpuTensor,
    ) -> Result<()> {
        let walk = self.check_backward((x, dy, dx), &saved.buffer)?;
        let batch = saved.check_backward(self.id, &walk.dims)?.batch;
        self.record_backward_passes(enc, &walk, (x, dy, dx), (&saved.buffer, batch), None)
    }

    /// Records the backward of an evaluation forward with tracked statistics
    /// from the running statistics as they are when the commands run.
    pub(super) fn record_backward_running(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<()> {
        let own = self.own_buffer();
        let walk = self.check_backward((x, dy, dx), &own)?;
        let ctx = self.ctx.clone();
        let p = self.plan(&walk, x.dtype(), 0)?.whole;
        let params = self.prepare(&p)?;
        let coeffs = self.eval_coeffs(&ctx.kernels().eval_coeffs, (&params, &p), &own)?;
        self.record_backward_passes(enc, &walk, (x, dy, dx), (&own, false), Some(coeffs))
    }
}

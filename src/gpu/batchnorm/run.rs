//! The blocking operations: a recording run through [`crate::GpuContext::run`]
//! (one submit, a wait) into outputs allocated for the call.

use super::{GpuBatchNorm, GpuForward, GpuGradients, GpuSavedStats};
use crate::config::Mode;
use crate::error::Result;
use crate::gpu::tensor::GpuTensor;
use crate::layout::{DType, Layout};
use crate::validate;

impl GpuBatchNorm {
    /// A tensor shaped like `x` for an output, counted among the layer's buffers.
    pub(super) fn output_like(&mut self, x: &GpuTensor, batch: bool) -> Result<GpuTensor> {
        self.check_tensor("x", x)?;
        let walk = validate::input(&self.config, x.shape(), batch)?;
        let t = GpuTensor::uninit_as(&self.ctx, &walk.dims, walk.layout, x.dtype())?;
        self.cache.counts.buffers += 1;
        Ok(t)
    }

    fn new_saved(&mut self) -> Result<GpuSavedStats> {
        let s = GpuSavedStats::new(self)?;
        self.cache.counts.buffers += 1;
        Ok(s)
    }

    /// Training forward, blocking: [`GpuBatchNorm::record_forward_train`]
    /// into a new output and a new [`GpuSavedStats`], submitted and waited for.
    ///
    /// # Errors
    /// As `record_forward_train`, and [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`]. On error the layer is unchanged.
    pub fn run_forward_train(&mut self, x: &GpuTensor) -> Result<GpuForward> {
        let y = self.output_like(x, true)?;
        let mut saved = self.new_saved()?;
        let ctx = self.ctx.clone();
        ctx.run("BatchNorm training forward", |enc| {
            self.record_forward_train(enc, x, &y, Some(&mut saved))
        })?;
        Ok(GpuForward { y, saved })
    }

    /// Evaluation forward, blocking: [`GpuBatchNorm::record_forward_eval`]
    /// into a new output and a new [`GpuSavedStats`], submitted and waited for.
    ///
    /// # Errors
    /// As `record_forward_eval`, and [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`]. On error the layer is unchanged.
    pub fn run_forward_eval(&mut self, x: &GpuTensor) -> Result<GpuForward> {
        let batch = validate::uses_batch_stats(&self.config, Mode::Eval);
        let y = self.output_like(x, batch)?;
        let mut saved = self.new_saved()?;
        let ctx = self.ctx.clone();
        ctx.run("BatchNorm evaluation forward", |enc| {
            self.record_forward_eval(enc, x, &y, Some(&mut saved))
        })?;
        Ok(GpuForward { y, saved })
    }

    /// Backward, blocking: [`GpuBatchNorm::record_backward`] into a new `dx`,
    /// and copies of the layer's `dweight`, `dbias` (affine only), submitted
    /// and waited for.
    ///
    /// # Errors
    /// As `record_backward`, and [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`].
    pub fn run_backward(
        &mut self,
        x: &GpuTensor,
        dy: &GpuTensor,
        saved: &GpuSavedStats,
    ) -> Result<GpuGradients> {
        self.run_backward_of(x, dy, Some(saved))
    }

    /// Backward of the forward that saved `saved`, or with `None` of an
    /// evaluation forward on the running statistics.
    pub(super) fn run_backward_of(
        &mut self,
        x: &GpuTensor,
        dy: &GpuTensor,
        saved: Option<&GpuSavedStats>,
    ) -> Result<GpuGradients> {
        let dx = self.output_like(x, false)?;
        let grads = self
            .config
            .affine
            .then(|| -> Result<_> {
                let c = [self.config.num_features];
                let dw = GpuTensor::uninit(&self.ctx, &c, Layout::ChannelsFirst)?;
                let db = GpuTensor::uninit(&self.ctx, &c, Layout::ChannelsFirst)?;
                self.cache.counts.buffers += 2;
                Ok((dw, db))
            })
            .transpose()?;
        let ctx = self.ctx.clone();
        ctx.run("BatchNorm backward", |enc| {
            match saved {
                Some(s) => self.record_backward(enc, x, dy, s, &dx)?,
                None => self.record_backward_running(enc, x, dy, &dx)?,
            }
            if let Some((dw, db)) = &grads {
                copy(enc, &self.views.dweight, dw);
                copy(enc, &self.views.dbias, db);
            }
            Ok(())
        })?;
        let (dweight, dbias) = grads.unzip();
        Ok(GpuGradients { dx, dweight, dbias })
    }
}

/// Records a copy of `src` into `dst` (f32 tensors of equal length).
fn copy(enc: &mut wgpu::CommandEncoder, src: &GpuTensor, dst: &GpuTensor) {
    debug_assert_eq!((src.dtype(), src.len()), (dst.dtype(), dst.len()));
    debug_assert_eq!(src.dtype(), DType::F32);
    enc.copy_buffer_to_buffer(
        src.buffer(),
        src.offset(),
        dst.buffer(),
        dst.offset(),
        src.bytes(),
    );
}

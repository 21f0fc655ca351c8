//! The blocking operations: a recording run through [`crate::GpuContext::run`]
//! (one submit, a wait) into outputs allocated for the call.

use super::backward::Gate;
use super::{GpuBatchNorm, GpuForward, GpuFusedGradients, GpuGradients, GpuSavedStats};
use crate::config::Mode;
use crate::error::Result;
use crate::fused::{Activation, Fusion};
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
        self.run_forward_train_fused(x, None, Activation::Identity)
    }

    /// Fused training forward, blocking:
    /// [`GpuBatchNorm::record_forward_train_fused`] into a new output and a
    /// new [`GpuSavedStats`], submitted and waited for.
    ///
    /// # Errors
    /// As `record_forward_train_fused`, and [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`]. On error the layer is unchanged.
    pub fn run_forward_train_fused(
        &mut self,
        x: &GpuTensor,
        z: Option<&GpuTensor>,
        activation: Activation,
    ) -> Result<GpuForward> {
        let y = self.output_like(x, true)?;
        let mut saved = self.new_saved()?;
        let ctx = self.ctx.clone();
        ctx.run("BatchNorm training forward", |enc| {
            self.record_forward_train_fused(enc, x, z, activation, &y, Some(&mut saved))
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
        self.run_forward_eval_fused(x, None, Activation::Identity)
    }

    /// Fused evaluation forward, blocking:
    /// [`GpuBatchNorm::record_forward_eval_fused`] into a new output and a
    /// new [`GpuSavedStats`], submitted and waited for.
    ///
    /// # Errors
    /// As `record_forward_eval_fused`, and [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`]. On error the layer is unchanged.
    pub fn run_forward_eval_fused(
        &mut self,
        x: &GpuTensor,
        z: Option<&GpuTensor>,
        activation: Activation,
    ) -> Result<GpuForward> {
        let batch = validate::uses_batch_stats(&self.config, Mode::Eval);
        let y = self.output_like(x, batch)?;
        let mut saved = self.new_saved()?;
        let ctx = self.ctx.clone();
        ctx.run("BatchNorm evaluation forward", |enc| {
            self.record_forward_eval_fused(enc, x, z, activation, &y, Some(&mut saved))
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
        Ok(self.run_backward_of(x, dy, None, Some(saved))?.grads)
    }

    /// Fused backward, blocking: [`GpuBatchNorm::record_backward_fused`]
    /// into a new `dx` and (with `fusion.residual`) a new `dz`, and copies of
    /// the layer's `dweight`, `dbias` (affine only), submitted and waited for.
    ///
    /// # Errors
    /// As `record_backward_fused`, and [`crate::Error::Wgpu`],
    /// [`crate::Error::DeviceLost`].
    pub fn run_backward_fused(
        &mut self,
        x: &GpuTensor,
        y: &GpuTensor,
        dy: &GpuTensor,
        fusion: Fusion,
        saved: &GpuSavedStats,
    ) -> Result<GpuFusedGradients> {
        self.run_backward_of(x, dy, Some((y, fusion)), Some(saved))
    }

    /// Backward of the forward that saved `saved`, or with `None` of an
    /// evaluation forward on the running statistics; of a fused forward with
    /// output `y` when `fused` is `Some((y, fusion))`.
    pub(super) fn run_backward_of(
        &mut self,
        x: &GpuTensor,
        dy: &GpuTensor,
        fused: Option<(&GpuTensor, Fusion)>,
        saved: Option<&GpuSavedStats>,
    ) -> Result<GpuFusedGradients> {
        let dx = self.output_like(x, false)?;
        let dz = fused
            .filter(|(_, f)| f.residual)
            .map(|_| self.output_like(x, false))
            .transpose()?;
        let gate = fused.map(|(y, fusion)| Gate {
            y,
            fusion,
            dz: dz.as_ref(),
        });
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
                Some(s) => self.record_backward_of(enc, (x, dy, &dx), s, gate)?,
                None => self.record_backward_running(enc, (x, dy, &dx), gate)?,
            }
            if let Some((dw, db)) = &grads {
                copy(enc, &self.views.dweight, dw);
                copy(enc, &self.views.dbias, db);
            }
            Ok(())
        })?;
        let (dweight, dbias) = grads.unzip();
        Ok(GpuFusedGradients {
            grads: GpuGradients { dx, dweight, dbias },
            dz,
        })
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

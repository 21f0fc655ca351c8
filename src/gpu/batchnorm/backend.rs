//! [`GpuBatchNorm`] behind the ndarray interface every backend shares.
//!
//! This interface keeps the statistics of its last forward for its backward,
//! as the CPU backends do; device-resident code passes [`GpuSavedStats`]
//! handles instead.

use super::{GpuBatchNorm, GpuSavedStats};
use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::Result;
use crate::fused::{Activation, FusedGradients, Fusion};
use crate::gpu::GpuTensor;
use crate::layout::DType;
use crate::state::{BatchNormState, Gradients, SavedStats};
use crate::validate;
use ndarray::{ArrayD, ArrayViewD};

impl GpuBatchNorm {
    /// Runs a forward of the ndarray `x`, fused with `z` and `activation`;
    /// `batch` forwards keep their statistics in `last_saved` for
    /// [`BatchNormBackend::backward`].
    fn array_forward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        z: Option<ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        let batch = validate::uses_batch_stats(&self.config, mode);
        validate::input(&self.config, x.shape(), batch)?;
        if let Some(z) = &z {
            validate::same_shape("z", x.shape(), z.shape())?;
        }
        let (layout, storage) = (self.config.layout, self.storage);
        let x = GpuTensor::from_array_as(&self.ctx, x, layout, storage)?;
        let z = z
            .map(|z| GpuTensor::from_array_as(&self.ctx, z, layout, storage))
            .transpose()?;
        let y = self.output_like(&x, batch)?;
        let mut saved = match self.last_saved.take() {
            Some(s) => s,
            None => GpuSavedStats::new(self)?,
        };
        let before = saved.written.clone();
        let ctx = self.ctx.clone();
        let result = ctx.run("BatchNorm forward", |enc| {
            let keep = batch.then_some(&mut saved);
            let z = z.as_ref();
            match mode {
                Mode::Train => self.record_forward_train_fused(enc, &x, z, activation, &y, keep),
                Mode::Eval => self.record_forward_eval_fused(enc, &x, z, activation, &y, keep),
            }
        });
        if result.is_err() {
            saved.written = before;
        }
        self.last_saved = Some(saved);
        result?;
        y.to_array()
    }

    /// Runs a backward of the ndarray `x`, `dy` in `mode`, of a fused
    /// forward with output `y` when `fused` is `Some((y, fusion))`.
    fn array_backward(
        &mut self,
        (x, dy): (ArrayViewD<'_, f32>, ArrayViewD<'_, f32>),
        fused: Option<(ArrayViewD<'_, f32>, Fusion)>,
        mode: Mode,
    ) -> Result<FusedGradients> {
        validate::backward_input(&self.config, x.shape(), dy.shape())?;
        if let Some((y, _)) = &fused {
            validate::same_shape("y", x.shape(), y.shape())?;
        }
        let batch = validate::uses_batch_stats(&self.config, mode);
        let saved = self.last_saved.take();
        let result = (|| {
            if batch {
                let dims = saved.as_ref().and_then(|s| s.dims()).filter(|_| {
                    saved.as_ref().and_then(GpuSavedStats::is_batch_stats) == Some(true)
                });
                validate::saved_shape(dims, x.shape())?;
            }
            let (layout, storage) = (self.config.layout, self.storage);
            let x = GpuTensor::from_array_as(&self.ctx, x, layout, storage)?;
            let dy = GpuTensor::from_array_as(&self.ctx, dy, layout, storage)?;
            let fused = fused
                .map(|(y, f)| Ok((GpuTensor::from_array_as(&self.ctx, y, layout, storage)?, f)))
                .transpose()?;
            let fused = fused.as_ref().map(|(y, f)| (y, *f));
            self.run_backward_of(&x, &dy, fused, saved.as_ref().filter(|_| batch))
        })();
        self.last_saved = saved;
        let g = result?;
        Ok(FusedGradients {
            dx: g.grads.dx.to_array()?,
            dz: g.dz.map(|t| t.to_array()).transpose()?,
            dweight: g.grads.dweight.map(|t| t.to_vec()).transpose()?,
            dbias: g.grads.dbias.map(|t| t.to_vec()).transpose()?,
        })
    }
}

impl BatchNormBackend for GpuBatchNorm {
    fn backend_name(&self) -> String {
        self.ctx.label()
    }

    fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.array_forward(x, None, Activation::Identity, Mode::Train)
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.array_forward(x, None, Activation::Identity, Mode::Eval)
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        let g = self.array_backward((x, dy), None, mode)?;
        Ok(Gradients {
            dx: g.dx,
            dweight: g.dweight,
            dbias: g.dbias,
        })
    }

    fn forward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        z: Option<ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        self.array_forward(x, z, activation, mode)
    }

    fn backward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        fusion: Fusion,
        mode: Mode,
    ) -> Result<FusedGradients> {
        self.array_backward((x, dy), Some((y, fusion)), mode)
    }

    fn saved_stats(&self) -> Result<Option<SavedStats>> {
        match &self.last_saved {
            Some(s) if s.is_batch_stats() == Some(true) => s.read(),
            _ => Ok(None),
        }
    }

    fn state(&self) -> Result<BatchNormState> {
        GpuBatchNorm::state(self)
    }

    fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        GpuBatchNorm::set_state(self, state)
    }

    fn storage_dtype(&self) -> DType {
        self.storage
    }

    fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        GpuBatchNorm::set_storage_dtype(self, dtype)
    }
}

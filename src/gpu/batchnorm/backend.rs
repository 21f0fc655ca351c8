//! [`GpuBatchNorm`] behind the ndarray interface every backend shares.
//!
//! This interface keeps the statistics of its last forward for its backward,
//! as the CPU backends do; device-resident code passes [`GpuSavedStats`]
//! handles instead.

use super::{GpuBatchNorm, GpuSavedStats};
use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::layout::DType;
use crate::state::{BatchNormState, Gradients, SavedStats};
use crate::validate;
use ndarray::{ArrayD, ArrayViewD};

impl GpuBatchNorm {
    /// Runs a forward of the ndarray `x`; `batch` forwards keep their
    /// statistics in `last_saved` for [`BatchNormBackend::backward`].
    fn array_forward(&mut self, x: ArrayViewD<'_, f32>, mode: Mode) -> Result<ArrayD<f32>> {
        let x = GpuTensor::from_array_as(&self.ctx, x, self.config.layout, self.storage)?;
        let batch = validate::uses_batch_stats(&self.config, mode);
        let y = self.output_like(&x, batch)?;
        let mut saved = match self.last_saved.take() {
            Some(s) => s,
            None => GpuSavedStats::new(self)?,
        };
        let before = saved.written.clone();
        let ctx = self.ctx.clone();
        let result = ctx.run("BatchNorm forward", |enc| {
            let keep = batch.then_some(&mut saved);
            match mode {
                Mode::Train => self.record_forward_train(enc, &x, &y, keep),
                Mode::Eval => self.record_forward_eval(enc, &x, &y, keep),
            }
        });
        if result.is_err() {
            saved.written = before;
        }
        self.last_saved = Some(saved);
        result?;
        y.to_array()
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
        self.array_forward(x, Mode::Train)
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.array_forward(x, Mode::Eval)
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        validate::backward_input(&self.config, x.shape(), dy.shape())?;
        let batch = validate::uses_batch_stats(&self.config, mode);
        let saved = self.last_saved.take();
        let result = (|| {
            if batch {
                let dims = saved.as_ref().and_then(|s| s.dims()).filter(|_| {
                    saved.as_ref().and_then(GpuSavedStats::is_batch_stats) == Some(true)
                });
                validate::saved_shape(dims, x.shape())?;
            }
            let x = GpuTensor::from_array_as(&self.ctx, x, self.config.layout, self.storage)?;
            let dy = GpuTensor::from_array_as(&self.ctx, dy, self.config.layout, self.storage)?;
            self.run_backward_of(&x, &dy, saved.as_ref().filter(|_| batch))
        })();
        self.last_saved = saved;
        let g = result?;
        Ok(Gradients {
            dx: g.dx.to_array()?,
            dweight: g.dweight.map(|t| t.to_vec()).transpose()?,
            dbias: g.dbias.map(|t| t.to_vec()).transpose()?,
        })
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

//! [`GpuBatchNorm`] behind the ndarray interface every backend shares.

use super::GpuBatchNorm;
use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::layout::DType;
use crate::state::{BatchNormState, Gradients, SavedStats};
use ndarray::{ArrayD, ArrayViewD};

impl BatchNormBackend for GpuBatchNorm {
    fn backend_name(&self) -> String {
        self.ctx.label()
    }

    fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let x = GpuTensor::from_array_as(&self.ctx, x, self.config.layout, self.storage)?;
        GpuBatchNorm::forward_train(self, &x)?.to_array()
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let x = GpuTensor::from_array_as(&self.ctx, x, self.config.layout, self.storage)?;
        GpuBatchNorm::forward_eval(self, &x)?.to_array()
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        let x = GpuTensor::from_array_as(&self.ctx, x, self.config.layout, self.storage)?;
        let dy = GpuTensor::from_array_as(&self.ctx, dy, self.config.layout, self.storage)?;
        let g = GpuBatchNorm::backward(self, &x, &dy, mode)?;
        Ok(Gradients {
            dx: g.dx.to_array()?,
            dweight: g.dweight.map(|t| t.to_vec()).transpose()?,
            dbias: g.dbias.map(|t| t.to_vec()).transpose()?,
        })
    }

    fn saved_stats(&self) -> Result<Option<SavedStats>> {
        GpuBatchNorm::saved_stats(self)
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

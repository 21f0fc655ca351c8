//! The layer's state on the device: parameters, running statistics and
//! gradients as tensors, and their readback and replacement.

use super::{GpuBatchNorm, GpuResourceCounts, section};
use crate::error::Result;
use crate::gpu::tensor::GpuTensor;
use crate::state::BatchNormState;

impl GpuBatchNorm {
    /// `weight` (`gamma`), shape `(C,)`, on the device (affine only). Kernels
    /// of the app may read and write it between calls, e.g. an optimizer step.
    ///
    /// All per-channel tensors of a layer (`weight`, `bias`, the running
    /// statistics, `dweight`, `dbias`) are views of one buffer at aligned
    /// offsets. wgpu tracks usage per buffer, so a kernel that writes one of
    /// them and reads another (`weight -= lr * dweight`) binds both as
    /// `read_write` storage.
    pub fn weight(&self) -> Option<&GpuTensor> {
        self.config.affine.then_some(&self.views.weight)
    }

    /// `bias` (`beta`), shape `(C,)`, on the device (affine only).
    pub fn bias(&self) -> Option<&GpuTensor> {
        self.config.affine.then_some(&self.views.bias)
    }

    /// `running_mean`, shape `(C,)`, on the device (tracking only).
    pub fn running_mean(&self) -> Option<&GpuTensor> {
        self.config
            .track_running_stats
            .then_some(&self.views.running_mean)
    }

    /// `running_var` (unbiased), shape `(C,)`, on the device (tracking only).
    pub fn running_var(&self) -> Option<&GpuTensor> {
        self.config
            .track_running_stats
            .then_some(&self.views.running_var)
    }

    /// The gradient of `weight` that the last backward to run wrote, shape
    /// `(C,)`, on the device (affine only). Each backward overwrites it.
    pub fn dweight(&self) -> Option<&GpuTensor> {
        self.config.affine.then_some(&self.views.dweight)
    }

    /// The gradient of `bias` that the last backward to run wrote (affine only).
    pub fn dbias(&self) -> Option<&GpuTensor> {
        self.config.affine.then_some(&self.views.dbias)
    }

    /// GPU buffers and bind groups this layer has created so far. Unchanged
    /// by calls whose shapes and buffers it has seen before.
    pub fn resource_counts(&self) -> GpuResourceCounts {
        self.cache.counts
    }

    /// Training steps counted so far (`None` without tracked statistics),
    /// read back from the device: the steps that have run.
    ///
    /// # Errors
    /// Device errors.
    pub fn num_batches_tracked(&self) -> Result<Option<u64>> {
        if !self.config.track_running_stats {
            return Ok(None);
        }
        let words = self.read_section(section::COUNTER, 2)?;
        Ok(Some(counter_value(&words)))
    }

    fn read_section(&self, s: usize, floats: usize) -> Result<Vec<f32>> {
        self.ctx
            .read_f32(&self.state, (s * self.stride * 4) as u64, floats)
    }

    /// Parameters and running statistics, read back from the device.
    ///
    /// # Errors
    /// Device errors.
    pub fn state(&self) -> Result<BatchNormState> {
        let c = self.config.num_features;
        let all = self.read_section(0, section::COUNTER * self.stride + 2)?;
        let at = |s: usize| all[s * self.stride..s * self.stride + c].to_vec();
        let (affine, track) = (self.config.affine, self.config.track_running_stats);
        Ok(BatchNormState {
            weight: affine.then(|| at(section::WEIGHT)),
            bias: affine.then(|| at(section::BIAS)),
            running_mean: track.then(|| at(section::RUNNING_MEAN)),
            running_var: track.then(|| at(section::RUNNING_VAR)),
            num_batches_tracked: track
                .then(|| counter_value(&all[section::COUNTER * self.stride..])),
        })
    }

    /// Replaces parameters and running statistics (and zeroes the
    /// gradients). Like `wgpu::Queue::write_buffer`, the values land before
    /// the commands of the next submit on the queue.
    ///
    /// # Errors
    /// [`crate::Error::ParameterLength`], [`crate::Error::MissingParameter`].
    pub fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        state.validate(&self.config)?;
        let c = self.config.num_features;
        let mut all = vec![0.0f32; section::COUNT * self.stride];
        let mut put = |s: usize, v: Option<&[f32]>, default: f32| {
            let dst = &mut all[s * self.stride..s * self.stride + c];
            match v {
                Some(v) => dst.copy_from_slice(v),
                None => dst.fill(default),
            }
        };
        put(section::WEIGHT, state.weight.as_deref(), 1.0);
        put(section::BIAS, state.bias.as_deref(), 0.0);
        put(section::RUNNING_MEAN, state.running_mean.as_deref(), 0.0);
        put(section::RUNNING_VAR, state.running_var.as_deref(), 1.0);
        let n = state.num_batches_tracked.unwrap_or(0);
        let counter = section::COUNTER * self.stride;
        all[counter] = f32::from_bits(n as u32);
        all[counter + 1] = f32::from_bits((n >> 32) as u32);
        self.ctx
            .queue()
            .write_buffer(&self.state, 0, bytemuck::cast_slice(&all));
        Ok(())
    }
}

/// num_batches_tracked from its (low, high) words.
fn counter_value(words: &[f32]) -> u64 {
    u64::from(words[0].to_bits()) | (u64::from(words[1].to_bits()) << 32)
}

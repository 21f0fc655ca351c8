//! The statistics a forward saves for its backward, as a handle the backward takes.

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::state::SavedStats;

/// The statistics one forward of one layer saved for its backward: per
/// channel the mean and `invstd` on the device (PyTorch's `save_mean`,
/// `save_invstd`), with the shape of that forward's input.
///
/// A training forward (or an evaluation forward without tracked statistics)
/// saves the batch statistics; an evaluation forward with tracked statistics
/// saves the running ones it normalized with. The backward of that forward
/// takes this handle, so two forwards in flight keep their own statistics.
/// Make one per forward whose backward is still to come and reuse it from
/// step to step: recording into a handle allocates nothing.
///
/// ```no_run
/// use wgpu_batchnorm::{BatchNormConfig, GpuBatchNorm, GpuContext, GpuTensor, Layout};
/// let ctx = GpuContext::new()?;
/// let mut bn = GpuBatchNorm::new(&ctx, BatchNormConfig::new(2))?;
/// let a = GpuTensor::from_slice(&ctx, &[1.0, 2.0, 3.0, 5.0], &[2, 2], Layout::ChannelsFirst)?;
/// let b = GpuTensor::from_slice(&ctx, &[0.0, 9.0, 4.0, 1.0], &[2, 2], Layout::ChannelsFirst)?;
/// let fa = bn.run_forward_train(&a)?;
/// let fb = bn.run_forward_train(&b)?;
/// let ga = bn.run_backward(&a, &fa.y, &fa.saved)?; // a's statistics, not b's
/// let gb = bn.run_backward(&b, &fb.y, &fb.saved)?;
/// assert_eq!(fa.saved.read()?.unwrap().mean, vec![2.0, 3.5]);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct GpuSavedStats {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) layer: u64,
    channels: usize,
    pub(crate) written: Option<Written>,
    ctx: GpuContext,
}

/// What the last forward recorded into a [`GpuSavedStats`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Written {
    /// Shape of that forward's input.
    pub dims: Vec<usize>,
    /// Batch statistics (else the running ones).
    pub batch: bool,
}

impl GpuSavedStats {
    /// An empty handle of `channels` channels for layer `layer` on `ctx` (`4 * C` floats)
    /// (`GpuSavedStats::new` is in the parent module, which knows layers).
    pub(super) fn empty(ctx: &GpuContext, layer: u64, channels: usize) -> Result<Self> {
        let buffer = ctx.storage_buffer("batchnorm.saved", (channels * 16) as u64)?;
        Ok(Self {
            buffer,
            layer,
            channels,
            written: None,
            ctx: ctx.clone(),
        })
    }

    /// Shape of the input of the forward that wrote the statistics (`None`
    /// before any forward).
    pub fn dims(&self) -> Option<&[usize]> {
        self.written.as_ref().map(|w| w.dims.as_slice())
    }

    /// Whether the statistics are batch statistics (`None` before any forward).
    pub fn is_batch_stats(&self) -> Option<bool> {
        self.written.as_ref().map(|w| w.batch)
    }

    /// The statistics, read back from the device (`None` before any forward).
    ///
    /// # Errors
    /// Device errors.
    pub fn read(&self) -> Result<Option<SavedStats>> {
        if self.written.is_none() {
            return Ok(None);
        }
        let v = self.ctx.read_f32(&self.buffer, 0, self.channels * 4)?;
        let (mean, invstd) = v.chunks_exact(4).map(|p| (p[0] + p[1], p[2])).unzip();
        Ok(Some(SavedStats { mean, invstd }))
    }

    /// The buffer: per channel four f32 `(K, d, invstd, 0)`, where the mean is
    /// `K + d`: `K` is a value of the channel (or the running mean) and `d`
    /// the mean of `x - K`, so that kernels centre `x` on the mean without the
    /// rounding of the mean to f32.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Errors unless a forward of layer `id` may write the handle.
    pub(crate) fn check_layer(&self, id: u64) -> Result<()> {
        if self.layer != id {
            return Err(Error::SavedStatsMismatch {
                why: format!(
                    "the handle was made for layer #{}, the forward is of layer #{id}",
                    self.layer
                ),
            });
        }
        Ok(())
    }

    /// Errors unless the handle holds what a backward of layer `id` on an
    /// input of shape `dims` needs.
    pub(crate) fn check_backward(&self, id: u64, dims: &[usize]) -> Result<&Written> {
        self.check_layer(id)?;
        let Some(w) = &self.written else {
            return Err(Error::NoSavedStatistics {
                detail: " (the handle has not been written by a forward)".into(),
            });
        };
        if w.dims != dims {
            return Err(Error::SavedStatsMismatch {
                why: format!(
                    "they belong to a forward on shape {:?}, the backward's input has shape {dims:?}",
                    w.dims
                ),
            });
        }
        Ok(w)
    }
}

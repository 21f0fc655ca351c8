//! The storage types a layer computes on: the dtype of its ndarray inputs,
//! and the kernels that read and write tensors of each dtype.

use super::GpuBatchNorm;
use crate::error::{Error, Result};
use crate::gpu::adapter::cpu_vulkan;
use crate::gpu::context::GpuContext;
use crate::gpu::pipelines::ElementKernels;
use crate::layout::DType;

impl GpuBatchNorm {
    /// Sets the storage type that the [`crate::BatchNormBackend`] methods round their
    /// ndarray inputs to before computing (outputs come back widened to f32).
    /// Device-resident calls take the type of the tensors they are given.
    /// f16 runs with WGSL's `f16` where the adapter has `SHADER_F16`, else
    /// as pairs of f16 in `u32` words (the same bytes), computing in f32
    /// either way. On lavapipe (a CPU adapter on Vulkan) f16 runs as pairs
    /// in words even with `SHADER_F16`: there the kernels pay by the
    /// component loaded, and the words halve the components (BENCHMARKS.md).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for f16 on a device that compiles neither
    /// (without `SHADER_F16` and without `pack2x16float`, wgpu's
    /// `DownlevelFlags::SHADER_F16_IN_F32`: Mesa's lavapipe without f16).
    pub fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        elements(&self.ctx, dtype, self.packed_f16)?;
        self.storage = dtype;
        Ok(())
    }

    /// Sends f16 tensors through the packed f16 kernels (pairs of f16 in
    /// `u32` words, the kernels of adapters without `SHADER_F16`; `true`)
    /// or through WGSL's `f16` where the adapter has `SHADER_F16` (`false`),
    /// instead of the default of [`GpuBatchNorm::set_storage_dtype`], so
    /// that tests compare the two on one device. Builds the packed pipelines
    /// on the first call of the context.
    ///
    /// # Errors
    /// [`crate::Error::Wgpu`] when the pipelines cannot be built.
    #[doc(hidden)]
    pub fn set_packed_f16(&mut self, packed: bool) -> Result<()> {
        if packed {
            self.ctx.kernels().f16_packed(self.ctx.device())?;
        }
        self.packed_f16 = Some(packed);
        Ok(())
    }
}

/// The element kernels of `ctx` for tensors stored as `dtype`; `packed`:
/// the packed f16 kernels where they were built, as set
/// ([`GpuBatchNorm::set_packed_f16`]), by default on lavapipe (built on
/// first use there).
///
/// # Errors
/// [`Error::Unsupported`] for f16 on a device without f16 kernels;
/// [`Error::Wgpu`] when the packed pipelines cannot be built.
pub(super) fn elements(
    ctx: &GpuContext,
    dtype: DType,
    packed: Option<bool>,
) -> Result<&ElementKernels> {
    let k = ctx.kernels();
    let packed = dtype == DType::F16 && packed.unwrap_or_else(|| cpu_vulkan(ctx.adapter_info()));
    if packed {
        k.f16_packed(ctx.device())?;
    }
    match dtype {
        DType::F32 => Ok(&k.f32),
        DType::F16 => k.f16(packed).map_err(|why| Error::Unsupported {
            adapter: ctx.label(),
            what: format!(
                "f16 storage needs the SHADER_F16 feature or pack2x16float and unpack2x16float (wgpu's SHADER_F16_IN_F32 downlevel flag); this device has neither: {why}"
            ),
        }),
    }
}

//! A vec4 copy kernel: the device's bandwidth roofline for `bnorm bench`.

use super::context::GpuContext;
use super::kernels::dispatch;
use super::tensor::GpuTensor;
use crate::error::{Error, Result};
use crate::shaders::WG;

impl GpuContext {
    /// Copies `src` into `dst` (same shape, same device) with a vec4 kernel,
    /// one submit, and waits: the bandwidth roofline `bnorm bench` measures
    /// BatchNorm against (8 bytes of traffic per `f32` element). Timed like
    /// any operation while [`GpuContext::set_timestamps`] is on.
    ///
    /// ```no_run
    /// use wgpu_batchnorm::{GpuContext, GpuTensor, Layout};
    /// let ctx = GpuContext::new()?;
    /// let src = GpuTensor::from_slice(&ctx, &[1.0, 2.0, 3.0, 4.0, 5.0], &[5, 1], Layout::ChannelsFirst)?;
    /// let dst = GpuTensor::uninit(&ctx, &[5, 1], Layout::ChannelsFirst)?;
    /// ctx.copy(&src, &dst)?;
    /// assert_eq!(dst.to_vec()?, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`] when a tensor lives on another device,
    /// [`Error::ShapeMismatch`] when the shapes (or storage sizes) differ,
    /// [`Error::Wgpu`], [`Error::DeviceLost`].
    pub fn copy(&self, src: &GpuTensor, dst: &GpuTensor) -> Result<()> {
        src.check_device("copy source", self)?;
        dst.check_device("copy destination", self)?;
        let bytes = src.buffer().size();
        if src.shape() != dst.shape() || dst.buffer().size() != bytes {
            return Err(Error::ShapeMismatch {
                what: format!("copy destination ({} bytes)", dst.buffer().size()),
                expected: src.shape().to_vec(),
                got: dst.shape().to_vec(),
            });
        }
        let vec4s = bytes / 16;
        let tail = bytes % 16;
        let kernel = &self.kernels().copy_vec4;
        let bind_group = (vec4s > 0).then(|| {
            let range = |buffer| {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(vec4s * 16),
                })
            };
            kernel.bind_resources(self.device(), &[range(src.buffer()), range(dst.buffer())])
        });
        let max_dim = self.limits().max_compute_workgroups_per_dimension.max(1);
        let workgroups =
            u32::try_from(vec4s.div_ceil(u64::from(WG))).map_err(|_| Error::TooLarge {
                what: format!("copy of {bytes} bytes"),
                bytes,
                limit_name: "u32 workgroup count",
                limit: u64::from(u32::MAX) * u64::from(WG) * 16,
            })?;
        self.submit("copy", |enc| {
            if let Some(bg) = &bind_group {
                dispatch(enc, kernel, bg, workgroups, max_dim);
            }
            if tail > 0 {
                let at = vec4s * 16;
                enc.copy_buffer_to_buffer(src.buffer(), at, dst.buffer(), at, tail);
            }
        })
    }
}

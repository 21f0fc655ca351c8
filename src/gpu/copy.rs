//! A vec4 copy kernel: the device's bandwidth roofline for `bnorm bench`.

use super::context::GpuContext;
use super::kernels::dispatch_alone;
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
        let bytes = src.bytes();
        if src.shape() != dst.shape() || src.dtype() != dst.dtype() {
            return Err(Error::ShapeMismatch {
                what: format!("copy destination ({})", dst.dtype()),
                expected: src.shape().to_vec(),
                got: dst.shape().to_vec(),
            });
        }
        if src.buffer() == dst.buffer() {
            return Err(Error::BufferAlias {
                what: "copy destination".into(),
                other: "copy source".into(),
            });
        }
        let vec4s = bytes / 16;
        // the tail rounded up to whole 4-byte words, which a view owns
        let tail = (bytes % 16).next_multiple_of(4);
        let kernel = &self.kernels().copy_vec4;
        let bind_group = (vec4s > 0).then(|| {
            fn range(t: &GpuTensor, bytes: u64) -> wgpu::BindingResource<'_> {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: t.buffer(),
                    offset: t.offset(),
                    size: wgpu::BufferSize::new(bytes),
                })
            }
            let resources = [range(src, vec4s * 16), range(dst, vec4s * 16)];
            kernel.bind_resources(self.device(), &resources)
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
                dispatch_alone(enc, kernel, bg, workgroups, max_dim);
            }
            if tail > 0 {
                let at = vec4s * 16;
                enc.copy_buffer_to_buffer(
                    src.buffer(),
                    src.offset() + at,
                    dst.buffer(),
                    dst.offset() + at,
                    tail,
                );
            }
        })
    }
}

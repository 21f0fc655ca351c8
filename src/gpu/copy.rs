//! A vec4 copy kernel: the device's bandwidth roofline for `bnorm bench`.

use super::context::GpuContext;
use super::tensor::GpuTensor;
use crate::error::{Error, Result};
use crate::shaders;

/// Threads per workgroup of `shaders/copy_vec4.wgsl`.
const WG: u32 = 256;

/// The pipeline of `shaders/copy_vec4.wgsl` with its explicit layout.
#[derive(Debug)]
pub(crate) struct CopyKernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl CopyKernel {
    /// Builds the pipeline (call inside an error scope).
    pub fn new(device: &wgpu::Device) -> Self {
        let label = "batchnorm.copy_vec4";
        let entry = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(label),
            entries: &[entry(0, true), entry(1, false)],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(shaders::COPY_VEC4.source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        Self { pipeline, layout }
    }
}

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
        for (what, t) in [("copy source", src), ("copy destination", dst)] {
            if t.context().id() != self.id() {
                return Err(Error::DeviceMismatch {
                    what: what.into(),
                    expected: self.id(),
                    expected_name: self.label(),
                    got: t.context().id(),
                    got_name: t.context().label(),
                });
            }
        }
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
        let kernel = &self.inner.copy_kernel;
        let bind_group = (vec4s > 0).then(|| {
            fn binding(buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(bytes),
                })
            }
            self.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("batchnorm.copy_vec4"),
                layout: &kernel.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: binding(src.buffer(), vec4s * 16),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: binding(dst.buffer(), vec4s * 16),
                    },
                ],
            })
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
                let x = workgroups.clamp(1, max_dim);
                let y = workgroups.div_ceil(x).max(1);
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("batchnorm.copy_vec4"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&kernel.pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
            if tail > 0 {
                let at = vec4s * 16;
                enc.copy_buffer_to_buffer(src.buffer(), at, dst.buffer(), at, tail);
            }
        })
    }
}

//! One pipeline with its bind group layout ([`Kernel`]), the uniform block
//! every kernel reads ([`Params`]), and recording a dispatch.

use crate::shaders::Shader;

/// Uniform block shared by every kernel of an operation.
///
/// Keep in sync with `Params` in shaders/common.wgsl (a test compares the two
/// layouts through naga's reflection of the shader module).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub channels: u32,
    pub outer: u32,
    pub inner: u32,
    pub total: u32,
    pub slices: u32,
    pub slice_len: u32,
    pub per_channel: u32,
    pub flags: u32,
    pub eps: f32,
    pub momentum: f32,
    pub unbias: f32,
    pub inv_m: f32,
    pub state_stride: u32,
    pub band: u32,
    pub steps: u32,
    pub band_cols: u32,
    pub red_cols: u32,
    pub red_inner: u32,
    pub red_tx: u32,
    pub red_major: u32,
    pub chunk_m: u32,
    pub part_base: u32,
    pub part_stride: u32,
    pub pad0: u32,
}

impl Params {
    /// The bytes of the block, as a hashable key.
    pub fn key(&self) -> [u32; 24] {
        bytemuck::cast(*self)
    }
}

/// How a kernel sees one binding.
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    Uniform,
    Read,
    Write,
}

/// One compute pipeline with its explicit bind group layout.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub label: String,
    /// The shader's name ([`Shader::name`]).
    pub name: &'static str,
}

impl Kernel {
    /// Builds the pipeline of `shader` with one buffer binding per slot (call
    /// inside an error scope).
    pub fn new(device: &wgpu::Device, shader: Shader, slots: &[Slot]) -> Self {
        Self::with_constants(device, shader, slots, &[])
    }

    /// [`Kernel::new`] with values for the shader's pipeline-overridable
    /// constants (`override` in WGSL), which the label shows.
    pub fn with_constants(
        device: &wgpu::Device,
        shader: Shader,
        slots: &[Slot],
        constants: &[(&str, f64)],
    ) -> Self {
        let mut label = format!("batchnorm.{}", shader.name);
        for (name, value) in constants {
            label.push_str(&format!(" {name}={value}"));
        }
        let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match slot {
                        Slot::Uniform => wgpu::BufferBindingType::Uniform,
                        Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Slot::Write => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: None,
        });
        Self {
            pipeline,
            layout,
            label,
            name: shader.name,
        }
    }

    /// A bind group of whole `buffers`, in binding order.
    #[cfg(test)]
    pub fn bind(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let resources: Vec<wgpu::BindingResource> =
            buffers.iter().map(|b| b.as_entire_binding()).collect();
        self.bind_resources(device, &resources)
    }

    /// A bind group of `resources` (whole buffers or ranges), in binding order.
    pub fn bind_resources(
        &self,
        device: &wgpu::Device,
        resources: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.label),
            layout: &self.layout,
            entries: &entries,
        })
    }
}

/// A kernel of a recorded dispatch: one of the context's fixed kernels, or
/// a pipeline built on first use and shared (the single-pass forward's).
#[derive(Debug, Clone)]
pub(crate) enum KernelRef<'k> {
    Fixed(&'k Kernel),
    Built(std::sync::Arc<Kernel>),
}

impl std::ops::Deref for KernelRef<'_> {
    type Target = Kernel;

    fn deref(&self) -> &Kernel {
        match self {
            Self::Fixed(k) => k,
            Self::Built(k) => k,
        }
    }
}

impl<'k> From<&'k Kernel> for KernelRef<'k> {
    fn from(k: &'k Kernel) -> Self {
        Self::Fixed(k)
    }
}

impl From<std::sync::Arc<Kernel>> for KernelRef<'_> {
    fn from(k: std::sync::Arc<Kernel>) -> Self {
        Self::Built(k)
    }
}

/// Records one dispatch of `workgroups` workgroups into `pass`, folded onto a
/// 2-D grid when one dimension is not enough (the shaders linearize with
/// `linear_workgroup`).
pub(crate) fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    kernel: &Kernel,
    bind_group: &wgpu::BindGroup,
    workgroups: u32,
    max_per_dim: u32,
) -> [u32; 2] {
    let x = workgroups.clamp(1, max_per_dim);
    let y = workgroups.div_ceil(x).max(1);
    pass.set_pipeline(&kernel.pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(x, y, 1);
    [x, y]
}

/// Records `dispatch` in a compute pass of its own, labelled by the kernel.
pub(crate) fn dispatch_alone(
    encoder: &mut wgpu::CommandEncoder,
    kernel: &Kernel,
    bind_group: &wgpu::BindGroup,
    workgroups: u32,
    max_per_dim: u32,
) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(&kernel.label),
        timestamp_writes: None,
    });
    dispatch(&mut pass, kernel, bind_group, workgroups, max_per_dim);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaders;
    use naga::{ScalarKind, TypeInner};

    /// `(name, offset, size, kind)` of each member of a struct.
    type Members = Vec<(String, u32, u32, ScalarKind)>;

    /// Members and size of `Params` as naga lays out the WGSL struct of
    /// shaders/common.wgsl (every shader holds the same text).
    fn wgsl_params() -> (Members, u32) {
        let module = naga::front::wgsl::parse_str(shaders::STATS_FINALIZE.source)
            .expect("stats_finalize parses");
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .expect("a struct named Params");
        let TypeInner::Struct { members, span } = &ty.inner else {
            panic!("Params is not a struct: {:?}", ty.inner);
        };
        let members = members
            .iter()
            .map(|m| {
                let kind = match module.types[m.ty].inner {
                    TypeInner::Scalar(s) => s.kind,
                    ref other => panic!("Params member {:?} is not a scalar: {other:?}", m.name),
                };
                let name = m.name.clone().unwrap_or_default();
                (name, m.offset, layouter[m.ty].size, kind)
            })
            .collect();
        (members, *span)
    }

    /// `(name, offset, size, kind)` of the listed fields of the Rust `Params`;
    /// the `let` fails to compile when a listed type is wrong.
    macro_rules! rust_members {
        ($($field:ident: $ty:ident),* $(,)?) => {{
            let p = Params::default();
            vec![$({
                let value: $ty = p.$field;
                let kind = if stringify!($ty) == "f32" { ScalarKind::Float } else { ScalarKind::Uint };
                (
                    stringify!($field).to_string(),
                    std::mem::offset_of!(Params, $field) as u32,
                    std::mem::size_of_val(&value) as u32,
                    kind,
                )
            }),*]
        }};
    }

    #[test]
    fn rust_and_wgsl_params_have_the_same_layout() {
        let rust = rust_members!(
            channels: u32,
            outer: u32,
            inner: u32,
            total: u32,
            slices: u32,
            slice_len: u32,
            per_channel: u32,
            flags: u32,
            eps: f32,
            momentum: f32,
            unbias: f32,
            inv_m: f32,
            state_stride: u32,
            band: u32,
            steps: u32,
            band_cols: u32,
            red_cols: u32,
            red_inner: u32,
            red_tx: u32,
            red_major: u32,
            chunk_m: u32,
            part_base: u32,
            part_stride: u32,
        );
        let (mut wgsl, span) = wgsl_params();
        // the padding words are checked through the size below
        wgsl.retain(|(name, ..)| !name.starts_with("pad"));
        assert_eq!(
            rust, wgsl,
            "Params in src/gpu/kernels.rs vs shaders/common.wgsl"
        );
        // Fields missing from the list above would show here.
        assert_eq!(std::mem::size_of::<Params>() as u32, span);
    }

    #[test]
    fn shader_constants_come_from_the_rust_ones() {
        let module = naga::front::wgsl::parse_str(shaders::NORMALIZE.source).expect("parses");
        let value = |name: &str| {
            let (_, c) = module
                .constants
                .iter()
                .find(|(_, c)| c.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no constant {name}"));
            match module.global_expressions[c.init] {
                naga::Expression::Literal(naga::Literal::U32(v)) => v,
                ref e => panic!("{name} = {e:?}"),
            }
        };
        assert_eq!(value("WG"), shaders::WG);
        assert_eq!(value("WG_CHANNEL"), shaders::WG_CHANNEL);
        assert_eq!(value("FLAG_UPDATE_RUNNING"), shaders::FLAG_UPDATE_RUNNING);
        assert_eq!(value("FLAG_BATCH_STATS"), shaders::FLAG_BATCH_STATS);
        assert_eq!(value("FLAG_CUMULATIVE"), shaders::FLAG_CUMULATIVE);
        assert_eq!(value("FLAG_LANE_CHANNELS"), shaders::FLAG_LANE_CHANNELS);
        assert_eq!(value("FLAG_RESIDUAL"), shaders::FLAG_RESIDUAL);
        assert_eq!(value("FLAG_RELU"), shaders::FLAG_RELU);
    }
}

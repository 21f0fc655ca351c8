//! Pipelines and bind group layouts, built once per device.

use crate::shaders::{self, Shader};

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
enum Slot {
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
    /// The shader's name (file name, `_f16` for the f16 variant).
    pub name: &'static str,
}

impl Kernel {
    /// Builds the pipeline of `shader` with one buffer binding per slot (call
    /// inside an error scope).
    fn new(device: &wgpu::Device, shader: Shader, slots: &[Slot]) -> Self {
        let label = format!("batchnorm.{}", shader.name);
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
            compilation_options: Default::default(),
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

/// The kernels that read or write the big tensors, for one storage type.
#[derive(Debug)]
pub(crate) struct ElementKernels {
    pub stats_partial: Kernel,
    pub stats_partial_vec4: Kernel,
    pub normalize: Kernel,
    pub normalize_vec4: Kernel,
    pub backward_partial: Kernel,
    pub backward_partial_vec4: Kernel,
    pub backward_dx: Kernel,
    pub backward_dx_vec4: Kernel,
    /// The variants of the backward passes of a fused backward: present
    /// only where the device binds [`GATED_STORAGE_BUFFERS`] storage buffers
    /// per stage, more than [`crate::GpuContext::required_limits`] asks for.
    pub fused: Option<FusedKernels>,
}

/// The backward passes of a fused backward, each `[scalar, vec4]`.
#[derive(Debug)]
pub(crate) struct FusedKernels {
    /// The reductions that gate `dy` and write it out (`_gated`).
    pub backward_partial_gated: [Kernel; 2],
    /// The dx passes that read the gated `dy` back from `dx` (`_in_place`).
    pub backward_dx_in_place: [Kernel; 2],
}

/// Storage buffers per stage (and bindings per group, one more) the gated
/// backward reductions use: `x`, `dy`, the saved statistics, the partials,
/// `y` and the gated `dy` they write.
pub(crate) const GATED_STORAGE_BUFFERS: u32 = 6;

/// Whether `device` can bind the gated backward reductions.
pub(crate) fn binds_gated(limits: &wgpu::Limits) -> bool {
    limits.max_storage_buffers_per_shader_stage >= GATED_STORAGE_BUFFERS
        && limits.max_bindings_per_bind_group > GATED_STORAGE_BUFFERS
}

impl ElementKernels {
    fn new(device: &wgpu::Device, f16: bool) -> Self {
        use Slot::{Read as R, Uniform as U, Write as W};
        let pick = |a: Shader, b: Shader| if f16 { b } else { a };
        let fused = binds_gated(&device.limits()).then(|| FusedKernels {
            backward_partial_gated: [
                pick(
                    shaders::BACKWARD_PARTIAL_GATED,
                    shaders::BACKWARD_PARTIAL_GATED_F16,
                ),
                pick(
                    shaders::BACKWARD_PARTIAL_VEC4_GATED,
                    shaders::BACKWARD_PARTIAL_VEC4_GATED_F16,
                ),
            ]
            .map(|s| Kernel::new(device, s, &[U, R, R, R, W, R, W])),
            backward_dx_in_place: [
                pick(
                    shaders::BACKWARD_DX_IN_PLACE,
                    shaders::BACKWARD_DX_IN_PLACE_F16,
                ),
                pick(
                    shaders::BACKWARD_DX_VEC4_IN_PLACE,
                    shaders::BACKWARD_DX_VEC4_IN_PLACE_F16,
                ),
            ]
            .map(|s| Kernel::new(device, s, &[U, R, R, R, W])),
        });
        Self {
            stats_partial: Kernel::new(
                device,
                pick(shaders::STATS_PARTIAL, shaders::STATS_PARTIAL_F16),
                &[U, R, W, W],
            ),
            stats_partial_vec4: Kernel::new(
                device,
                pick(shaders::STATS_PARTIAL_VEC4, shaders::STATS_PARTIAL_VEC4_F16),
                &[U, R, W, W],
            ),
            normalize: Kernel::new(
                device,
                pick(shaders::NORMALIZE, shaders::NORMALIZE_F16),
                &[U, R, R, W, R],
            ),
            normalize_vec4: Kernel::new(
                device,
                pick(shaders::NORMALIZE_VEC4, shaders::NORMALIZE_VEC4_F16),
                &[U, R, R, W, R],
            ),
            backward_partial: Kernel::new(
                device,
                pick(shaders::BACKWARD_PARTIAL, shaders::BACKWARD_PARTIAL_F16),
                &[U, R, R, R, W],
            ),
            backward_partial_vec4: Kernel::new(
                device,
                pick(
                    shaders::BACKWARD_PARTIAL_VEC4,
                    shaders::BACKWARD_PARTIAL_VEC4_F16,
                ),
                &[U, R, R, R, W],
            ),
            backward_dx: Kernel::new(
                device,
                pick(shaders::BACKWARD_DX, shaders::BACKWARD_DX_F16),
                &[U, R, R, R, W],
            ),
            backward_dx_vec4: Kernel::new(
                device,
                pick(shaders::BACKWARD_DX_VEC4, shaders::BACKWARD_DX_VEC4_F16),
                &[U, R, R, R, W],
            ),
            fused,
        }
    }
}

impl ElementKernels {
    /// The normalize pass: vec4 when a row (`C * inner` elements) is a multiple of 4.
    pub fn normalize(&self, vec4: bool) -> &Kernel {
        if vec4 {
            &self.normalize_vec4
        } else {
            &self.normalize
        }
    }

    /// The statistics pass: vec4 when the reduction's items are vec4s.
    pub fn stats_partial(&self, vec4: bool) -> &Kernel {
        if vec4 {
            &self.stats_partial_vec4
        } else {
            &self.stats_partial
        }
    }

    /// The backward reduction: vec4 when the reduction's items are vec4s.
    pub fn backward_partial(&self, vec4: bool) -> &Kernel {
        if vec4 {
            &self.backward_partial_vec4
        } else {
            &self.backward_partial
        }
    }

    /// The dx pass: vec4 when a row (`C * inner` elements) is a multiple of 4.
    pub fn backward_dx(&self, vec4: bool) -> &Kernel {
        if vec4 {
            &self.backward_dx_vec4
        } else {
            &self.backward_dx
        }
    }
}

impl FusedKernels {
    /// The gated backward reduction (vec4 as [`ElementKernels::backward_partial`]).
    pub fn backward_partial_gated(&self, vec4: bool) -> &Kernel {
        &self.backward_partial_gated[usize::from(vec4)]
    }

    /// The in-place dx pass (vec4 as [`ElementKernels::backward_dx`]).
    pub fn backward_dx_in_place(&self, vec4: bool) -> &Kernel {
        &self.backward_dx_in_place[usize::from(vec4)]
    }
}

/// Every pipeline of the crate, for one device.
#[derive(Debug)]
pub(crate) struct Kernels {
    // Keep STORAGE_BUFFERS_PER_STAGE in context.rs at the most storage
    // bindings of one kernel below (4), the optional fused kernels of
    // `ElementKernels` (GATED_STORAGE_BUFFERS) aside.
    pub stats_finalize: Kernel,
    pub eval_coeffs: Kernel,
    pub backward_finalize: Kernel,
    pub f32: ElementKernels,
    /// Present when the device has `SHADER_F16`.
    pub f16: Option<ElementKernels>,
    /// The bandwidth roofline of `GpuContext::copy`.
    pub copy_vec4: Kernel,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, f16: bool) -> Self {
        use Slot::{Read as R, Uniform as U, Write as W};
        Self {
            stats_finalize: Kernel::new(device, shaders::STATS_FINALIZE, &[U, R, W, W, W]),
            eval_coeffs: Kernel::new(device, shaders::EVAL_COEFFS, &[U, R, W, W]),
            backward_finalize: Kernel::new(device, shaders::BACKWARD_FINALIZE, &[U, R, R, W, W]),
            f32: ElementKernels::new(device, false),
            f16: f16.then(|| ElementKernels::new(device, true)),
            copy_vec4: Kernel::new(device, shaders::COPY_VEC4, &[R, W]),
        }
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

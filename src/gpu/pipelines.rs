//! Every pipeline of the crate for one device ([`Kernels`]): the per-channel
//! kernels, and the kernels that touch the big tensors in one set per
//! storage type ([`ElementKernels`]).
//!
//! f16 tensors are read and written by the `_f16` kernels (WGSL's `f16`)
//! where the device has `SHADER_F16`, and by the `_f16_packed` kernels
//! (pairs of f16 in `u32` words, core WGSL) where it does not, and on
//! lavapipe, where they measured faster: the same bytes either way.

use super::device::ErrorScopes;
use super::kernels::{Kernel, Slot};
use crate::error::Result;
use crate::shaders::{self, Storage};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

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
    /// The storage these kernels read and write.
    pub storage: Storage,
    /// The single-pass training forward's pipelines, built on first use,
    /// one per [`SingleKey`].
    single: Mutex<HashMap<SingleKey, Arc<Kernel>>>,
}

/// What a single pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SingleOp {
    /// The forward with batch statistics (`forward_single*`).
    Train,
    /// The evaluation forward from the running statistics (`forward_single`
    /// with `EVAL`).
    Eval,
    /// The backward with batch statistics (`backward_single`).
    Backward,
}

/// One single-pass pipeline (shaders/single.wgsl): what it computes, and
/// its overrides: what an item is (`ITEMS`), threads per
/// channel group (`T`), items per thread (`K`), the fusion (`FUSED`: the
/// `FLAG_RESIDUAL` and `FLAG_RELU` bits) and whether a forward's grid is one
/// workgroup that finishes its channels itself (`ALONE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SingleKey {
    pub op: SingleOp,
    /// `ITEMS_RUN4` (0), `ITEMS_LANES` (1), `ITEMS_SCALAR` (2) or `ITEMS_QUADS` (3).
    pub items: u32,
    pub t: u32,
    pub k: u32,
    pub fused: u32,
    /// A forward of one workgroup, with no `single_finalize` after it.
    pub alone: bool,
    /// The subgroup size the merges run in (`SG` of
    /// shaders/single_merge_subgroup.wgsl), or 0 for merges through
    /// workgroup memory (shaders/single_merge.wgsl).
    pub subgroup: u32,
}

impl SingleKey {
    /// `ITEMS_SCALAR`: items of four single elements (forward_single_scalar).
    pub const SCALAR: u32 = 2;
    /// `ITEMS_QUADS`: vec4s of the runs of four adjacent channels.
    pub const QUADS: u32 = 3;
}

/// Storage buffers per stage (and bindings per group, one more) of the
/// single-pass forward: `x`, the state, the saved statistics, `y`, `z`.
pub(crate) const SINGLE_STORAGE_BUFFERS: u32 = 5;

/// Storage buffers per stage (and bindings per group, one more) of the
/// single-pass backward: `x`, the state, the saved statistics, `dx`, `dy`,
/// `y` and `dz` (stand-ins where unfused).
pub(crate) const SINGLE_BACKWARD_STORAGE_BUFFERS: u32 = 7;

/// Bytes of workgroup memory of the single passes (shaders/single.wgsl:
/// a vec4 and a word for each of `WG` threads and twice `WG / 16` partials).
pub(crate) const SINGLE_WORKGROUP_BYTES: u32 = 20 * (shaders::WG + 2 * (shaders::WG / 16));

/// Whether `device` can run the single-pass forward (or, `backward`, the
/// single-pass backward).
pub(crate) fn binds_single(limits: &wgpu::Limits, backward: bool) -> bool {
    let storage = if backward {
        SINGLE_BACKWARD_STORAGE_BUFFERS
    } else {
        SINGLE_STORAGE_BUFFERS
    };
    limits.max_storage_buffers_per_shader_stage >= storage
        && limits.max_bindings_per_bind_group > storage
        && limits.max_compute_workgroup_storage_size >= SINGLE_WORKGROUP_BYTES
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
    /// The kernels for `storage` (call inside an error scope).
    fn new(device: &wgpu::Device, storage: Storage) -> Self {
        use Slot::{Read as R, Uniform as U, Write as W};
        use shaders::*;
        let kernel = |variants: [Shader; 3], slots: &[Slot]| {
            Kernel::new(device, storage.pick(variants), slots)
        };
        let fused = binds_gated(&device.limits()).then(|| FusedKernels {
            backward_partial_gated: [
                [
                    BACKWARD_PARTIAL_GATED,
                    BACKWARD_PARTIAL_GATED_F16,
                    BACKWARD_PARTIAL_GATED_F16_PACKED,
                ],
                [
                    BACKWARD_PARTIAL_VEC4_GATED,
                    BACKWARD_PARTIAL_VEC4_GATED_F16,
                    BACKWARD_PARTIAL_VEC4_GATED_F16_PACKED,
                ],
            ]
            .map(|v| kernel(v, &[U, R, R, R, W, R, W])),
            backward_dx_in_place: [
                [
                    BACKWARD_DX_IN_PLACE,
                    BACKWARD_DX_IN_PLACE_F16,
                    BACKWARD_DX_IN_PLACE_F16_PACKED,
                ],
                [
                    BACKWARD_DX_VEC4_IN_PLACE,
                    BACKWARD_DX_VEC4_IN_PLACE_F16,
                    BACKWARD_DX_VEC4_IN_PLACE_F16_PACKED,
                ],
            ]
            .map(|v| kernel(v, &[U, R, R, R, W])),
        });
        let stats = [U, R, W, W];
        let normalize = [U, R, R, W, R];
        let backward = [U, R, R, R, W];
        Self {
            stats_partial: kernel(
                [STATS_PARTIAL, STATS_PARTIAL_F16, STATS_PARTIAL_F16_PACKED],
                &stats,
            ),
            stats_partial_vec4: kernel(
                [
                    STATS_PARTIAL_VEC4,
                    STATS_PARTIAL_VEC4_F16,
                    STATS_PARTIAL_VEC4_F16_PACKED,
                ],
                &stats,
            ),
            normalize: kernel([NORMALIZE, NORMALIZE_F16, NORMALIZE_F16_PACKED], &normalize),
            normalize_vec4: kernel(
                [
                    NORMALIZE_VEC4,
                    NORMALIZE_VEC4_F16,
                    NORMALIZE_VEC4_F16_PACKED,
                ],
                &normalize,
            ),
            backward_partial: kernel(
                [
                    BACKWARD_PARTIAL,
                    BACKWARD_PARTIAL_F16,
                    BACKWARD_PARTIAL_F16_PACKED,
                ],
                &backward,
            ),
            backward_partial_vec4: kernel(
                [
                    BACKWARD_PARTIAL_VEC4,
                    BACKWARD_PARTIAL_VEC4_F16,
                    BACKWARD_PARTIAL_VEC4_F16_PACKED,
                ],
                &backward,
            ),
            backward_dx: kernel(
                [BACKWARD_DX, BACKWARD_DX_F16, BACKWARD_DX_F16_PACKED],
                &backward,
            ),
            backward_dx_vec4: kernel(
                [
                    BACKWARD_DX_VEC4,
                    BACKWARD_DX_VEC4_F16,
                    BACKWARD_DX_VEC4_F16_PACKED,
                ],
                &backward,
            ),
            fused,
            storage,
            single: Mutex::default(),
        }
    }

    /// The single-pass pipeline of `key`, built on its first use. `None`
    /// for items of single elements in packed f16 (see
    /// [`shaders::NO_PACKED`]), an evaluation or a backward (vec4 items
    /// only).
    ///
    /// # Errors
    /// [`crate::Error::Wgpu`] when the pipeline cannot be built.
    pub fn single(&self, device: &wgpu::Device, key: SingleKey) -> Result<Option<Arc<Kernel>>> {
        use shaders::*;
        let scalar = key.items == SingleKey::SCALAR;
        let backward = key.op == SingleOp::Backward;
        let sub = key.subgroup != 0;
        // [f32, f16, packed f16]; items of single elements have no packed variant
        let variants = match (scalar, backward, sub) {
            (true, _, _) if key.op != SingleOp::Train => return Ok(None),
            (false, true, false) => [
                Some(BACKWARD_SINGLE),
                Some(BACKWARD_SINGLE_F16),
                Some(BACKWARD_SINGLE_F16_PACKED),
            ],
            (false, true, true) => [
                Some(BACKWARD_SINGLE_SUBGROUP),
                Some(BACKWARD_SINGLE_SUBGROUP_F16),
                Some(BACKWARD_SINGLE_SUBGROUP_F16_PACKED),
            ],
            (false, false, false) => [
                Some(FORWARD_SINGLE),
                Some(FORWARD_SINGLE_F16),
                Some(FORWARD_SINGLE_F16_PACKED),
            ],
            (false, false, true) => [
                Some(FORWARD_SINGLE_SUBGROUP),
                Some(FORWARD_SINGLE_SUBGROUP_F16),
                Some(FORWARD_SINGLE_SUBGROUP_F16_PACKED),
            ],
            (true, _, false) => [
                Some(FORWARD_SINGLE_SCALAR),
                Some(FORWARD_SINGLE_SCALAR_F16),
                None,
            ],
            (true, _, true) => [
                Some(FORWARD_SINGLE_SCALAR_SUBGROUP),
                Some(FORWARD_SINGLE_SCALAR_SUBGROUP_F16),
                None,
            ],
        };
        let Some(shader) = self.storage.pick(variants) else {
            return Ok(None);
        };
        let mut built = self.single.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = built.get(&key) {
            return Ok(Some(k.clone()));
        }
        use Slot::{Read as R, Uniform as U, Write as W};
        let scope = ErrorScopes::push(device);
        let slots: &[Slot] = if backward {
            &[U, R, W, W, W, R, R, W]
        } else {
            &[U, R, W, W, W, R]
        };
        let mut constants = vec![
            ("ITEMS", f64::from(key.items)),
            ("T", f64::from(key.t)),
            ("K", f64::from(key.k)),
            ("FUSED", f64::from(key.fused)),
            ("ALONE", f64::from(u8::from(key.alone))),
            ("EVAL", f64::from(u8::from(key.op == SingleOp::Eval))),
        ];
        if sub {
            constants.push(("SG", f64::from(key.subgroup)));
        }
        let kernel = Kernel::with_constants(device, shader, slots, &constants);
        scope.pop(&format!("building the pipeline {}", kernel.label))?;
        let kernel = Arc::new(kernel);
        built.insert(key, kernel.clone());
        Ok(Some(kernel))
    }

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
    /// Counts the batch and finishes the statistics after the single-pass forward.
    pub single_finalize: Kernel,
    pub eval_coeffs: Kernel,
    pub backward_finalize: Kernel,
    pub f32: ElementKernels,
    /// f16 storage: [`Storage::F16`] where the device has `SHADER_F16`,
    /// else [`Storage::F16Packed`], or why the device refused those.
    f16: std::result::Result<ElementKernels, String>,
    /// The storage of `f16`.
    f16_storage: Storage,
    /// [`Storage::F16Packed`] on a device with `SHADER_F16`, built on
    /// request ([`Kernels::f16_packed`]).
    f16_packed: OnceLock<ElementKernels>,
    /// The bandwidth roofline of `GpuContext::copy`.
    pub copy_vec4: Kernel,
}

impl Kernels {
    /// The pipelines of `device` (call inside an error scope); f16 in the
    /// storage [`Storage::f16_on`] gives for its features. The packed f16
    /// kernels are built in a validation scope of their own: a device
    /// without `pack2x16float` (wgpu's `DownlevelFlags::SHADER_F16_IN_F32`,
    /// which an app's device does not tell) refuses them, and then has no f16.
    pub fn new(device: &wgpu::Device) -> Self {
        use Slot::{Read as R, Uniform as U, Write as W};
        let f16_storage = Storage::f16_on(device.features());
        let f16 = if f16_storage == Storage::F16 {
            Ok(ElementKernels::new(device, Storage::F16))
        } else {
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let packed = ElementKernels::new(device, Storage::F16Packed);
            let refused = pollster::block_on(scope.pop());
            refused.map_or(Ok(packed), |e| Err(e.to_string()))
        };
        Self {
            stats_finalize: Kernel::new(device, shaders::STATS_FINALIZE, &[U, R, W, W, W]),
            single_finalize: Kernel::new(device, shaders::SINGLE_FINALIZE, &[U, W, W]),
            eval_coeffs: Kernel::new(device, shaders::EVAL_COEFFS, &[U, R, W, W]),
            backward_finalize: Kernel::new(device, shaders::BACKWARD_FINALIZE, &[U, R, R, W, W]),
            f32: ElementKernels::new(device, Storage::F32),
            f16,
            f16_storage,
            f16_packed: OnceLock::new(),
            copy_vec4: Kernel::new(device, shaders::COPY_VEC4, &[R, W]),
        }
    }

    /// The packed f16 kernels: `f16` on a device without `SHADER_F16`;
    /// on one with it, built on the first call.
    ///
    /// # Errors
    /// [`crate::Error::Wgpu`] when the pipelines cannot be built.
    pub fn f16_packed(&self, device: &wgpu::Device) -> Result<Option<&ElementKernels>> {
        if self.f16_storage == Storage::F16Packed {
            return Ok(self.f16.as_ref().ok());
        }
        if let Some(k) = self.f16_packed.get() {
            return Ok(Some(k));
        }
        let scope = ErrorScopes::push(device);
        let built = ElementKernels::new(device, Storage::F16Packed);
        scope.pop("building the packed f16 pipelines")?;
        Ok(Some(self.f16_packed.get_or_init(|| built)))
    }

    /// The f16 kernels: the packed ones when `packed` and built
    /// ([`Kernels::f16_packed`]), else `f16`; or why the device has none.
    pub fn f16(&self, packed: bool) -> std::result::Result<&ElementKernels, &str> {
        match (self.f16_packed.get(), &self.f16) {
            (Some(k), _) if packed => Ok(k),
            (_, Ok(k)) => Ok(k),
            (_, Err(why)) => Err(why),
        }
    }
}

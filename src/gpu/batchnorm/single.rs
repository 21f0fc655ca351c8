//! The single passes (`shaders/single.wgsl`), for channels small enough
//! that a group of threads holds one in registers: the training forward
//! (statistics, running statistics and `y` in one dispatch that reads `x`
//! once, and a second, `single_finalize`, unless the grid is one
//! workgroup), the evaluation forward (coefficients and `y` in one
//! dispatch) and the backward (`dweight`, `dbias` and `dx` in one dispatch
//! that reads `x` and `dy` once).
//!
//! Small tensors take them on every adapter by default: each dispatch
//! saved weighs more there than the traffic (on lavapipe and llvmpipe's
//! GL a dispatch costs 190 to 250 µs of host wall time at the median,
//! BENCHMARKS.md).
//!
//! The multi-pass forward reads `x` twice (statistics, then normalize), and
//! the multi-pass backward `x` and `dy` twice (sums, then `dx`). On Mesa's
//! lavapipe a load of `x` costs about 0.75 of a copy of it and a store 0.25
//! (BENCHMARKS.md, "What a load costs on lavapipe"), so the passes cannot
//! pass 0.86 (forward) and 0.77 (backward) of the copy there; the single
//! passes read each input once.

use super::plan::Plan;
use super::{GpuBatchNorm, Pass};
use crate::error::{Error, Result};
use crate::gpu::adapter::{cpu_vulkan, fixed_subgroup_size};
use crate::gpu::kernels::Kernel;
use crate::gpu::pipelines::{ElementKernels, SingleKey, SingleOp, binds_single};
use crate::gpu::tensor::GpuTensor;
use crate::shaders::{FLAG_BATCH_STATS, FLAG_RELU, FLAG_RESIDUAL, WG};

/// Threads per channel group the single pass may use (`T`).
const GROUP_THREADS: [u32; 5] = [16, 32, 64, 128, 256];
/// Items (vec4s) per thread the choice of `T` aims at most for: fewer
/// threads per channel means fewer merge steps, more items per thread more
/// registers. On a GPU, whose threads share a register file, 16.
const K_AIM: u64 = 16;
/// [`K_AIM`] on a CPU adapter, which keeps a thread's items in its stack:
/// on lavapipe, with subgroup merges, 32 ran the training forward and the
/// backward at most shapes as fast or faster than 16 (1.1 to 1.2x at
/// 32x7x7x2048 NHWC and 32x2048x7x7 NCHW), and 8 slower (BENCHMARKS.md).
const K_AIM_CPU: u64 = 32;
/// The most items a thread holds (`K_MAX` of single.wgsl).
const K_MAX: u64 = 32;
/// Tensors of at most this many elements take the single passes by
/// default on every adapter: one dispatch instead of two or three weighs
/// more than their traffic. On llvmpipe's GL the training forward and
/// backward in one pass were faster up to 2^17 elements and slower from
/// 2^18, on lavapipe faster at both (BENCHMARKS.md).
const SMALL_TENSOR: u64 = 1 << 17;
/// On a CPU adapter the training forward and the backward with batch
/// statistics take one pass up to this many elements: on llvmpipe's GL,
/// with about 32 items a thread ([`K_AIM_CPU`]), they ran 1.05-1.2x faster
/// in one pass at 2^18 and 2^19 elements, and the training forward slower
/// at 32x1024x14x14 (BENCHMARKS.md).
const MID_TENSOR_CPU: u64 = 1 << 19;

/// The grid of a single-pass forward: its pipeline's overrides and its
/// workgroups (each `WG / T` groups of `T` threads, a group per channel or
/// per four channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SingleGrid {
    pub key: SingleKey,
    pub workgroups: u32,
}

impl SingleGrid {
    /// The grid for `outer` runs of `inner` elements of each of `channels`
    /// channels, with at most about `aim` items a thread ([`K_AIM`],
    /// [`K_AIM_CPU`]), or `None` when a channel has more than `K_MAX * 4 *
    /// WG` elements.
    pub fn new(outer: u32, channels: u32, inner: u32, aim: u64) -> Option<Self> {
        let m = u64::from(outer) * u64::from(inner);
        // (ITEMS, items per channel group, channel groups)
        let (items, per, groups) = if inner.is_multiple_of(4) {
            (0, m / 4, channels)
        } else if inner == 1 && channels.is_multiple_of(4) {
            (1, m, channels / 4)
        } else if inner > 4 && channels.is_multiple_of(4) {
            // ITEMS_QUADS: the runs of four adjacent channels, in vec4s
            (SingleKey::QUADS, m, channels / 4)
        } else {
            (SingleKey::SCALAR, m.div_ceil(4), channels)
        };
        let fits = |t: &&u32| per.div_ceil(u64::from(**t)) <= aim;
        let t = match GROUP_THREADS.iter().find(fits) {
            Some(&t) => t,
            None if per.div_ceil(u64::from(WG)) <= K_MAX => WG,
            None => return None,
        };
        let k = per.div_ceil(u64::from(t)) as u32;
        Some(Self {
            key: SingleKey {
                op: SingleOp::Train,
                items,
                t,
                k,
                fused: 0,
                alone: false,
                subgroup: 0,
            },
            workgroups: groups.div_ceil(WG / t),
        })
    }
}

impl GpuBatchNorm {
    /// Chooses how a training forward (and an evaluation forward with batch
    /// statistics), an evaluation forward from the running statistics and
    /// the backward with batch statistics run: in one pass that reads `x`
    /// (and `dy`) once, or in passes (`stats_partial`, `stats_finalize`,
    /// `normalize`; `eval_coeffs`, `normalize`; `backward_partial`,
    /// `backward_finalize`, `backward_dx`).
    ///
    /// - `None`, the default: in one pass where it applies and was
    ///   measured to pay (BENCHMARKS.md):
    ///   - on every adapter, for tensors of at most 2^17 elements, where
    ///     the dispatches saved weigh more than the traffic (on lavapipe
    ///     and llvmpipe's GL each dispatch cost 190 to 250 µs, the
    ///     training forward of a 32x64 tensor ran 2.4x faster in one pass);
    ///   - on a CPU adapter (lavapipe, llvmpipe's GL), the training forward
    ///     and the backward with batch statistics up to 2^19 elements;
    ///   - on a CPU adapter on Vulkan (lavapipe) also for larger tensors,
    ///     the training forward and the backward with batch statistics,
    ///     with vec4 items (runs a multiple of 4 long; one element per run
    ///     and C a multiple of 4; four channels' runs one after the other).
    ///     On llvmpipe's GL, and for the evaluation forward on lavapipe,
    ///     the passes ran faster there.
    /// - `Some(true)`: in one pass wherever it applies, on any adapter.
    /// - `Some(false)`: never in one pass.
    ///
    /// The training forward applies when a channel has at most 32768
    /// elements (32 vec4s for each of 256 threads), the tensor fits one
    /// storage binding, the device binds 5 storage buffers per stage, and,
    /// for f16 stored in `u32` words (devices without `SHADER_F16`), its
    /// items are vec4s. The evaluation forward applies on the same terms
    /// for vec4 items. The backward, plain or fused, with the batch
    /// statistics (of a training forward, or of an evaluation forward
    /// without tracked statistics) or the running ones, applies on the same
    /// terms for vec4 items, on a device that binds 7 storage buffers per
    /// stage.
    /// [`GpuBatchNorm::last_dispatches`] shows which ran: `forward_single`
    /// (or `forward_single_scalar`), followed by `single_finalize` unless
    /// its grid is one workgroup (which then counts the batch and moves
    /// the running statistics itself), `backward_single`, or the passes.
    pub fn set_single_pass(&mut self, single: Option<bool>) {
        self.single_pass = single;
    }

    /// Chooses how the single passes of the training forward and the
    /// backward merge their threads' sums: in subgroups (`subgroupAdd`, one
    /// barrier a merge) or through workgroup memory (three barriers).
    /// Subgroup merges take a device with wgpu's `SUBGROUP` feature
    /// ([`crate::GpuContext`] asks for it where the adapter has it) whose
    /// adapter runs compute shaders in subgroups of one fixed size that
    /// divides the threads of a channel group, and they take invocation
    /// `i` of a workgroup to be lane `i % size` of subgroup `i / size`.
    ///
    /// - `None`, the default: in subgroups on a CPU adapter on Vulkan
    ///   (lavapipe: subgroups of 8, tested there), where they ran the
    ///   single-pass training forward 1.03-1.11x faster end to end (its
    ///   kernel alone 1.1-1.2x; BENCHMARKS.md); through workgroup memory
    ///   elsewhere.
    /// - `Some(true)`: in subgroups wherever the device can.
    /// - `Some(false)`: through workgroup memory.
    ///
    /// [`GpuBatchNorm::last_dispatches`] names the pipeline that ran:
    /// `forward_single_subgroup`, `backward_single_subgroup`.
    pub fn set_subgroup_merges(&mut self, subgroups: Option<bool>) {
        self.subgroup_merges = subgroups;
    }

    /// The subgroup size the merges of a single pass with groups of `t`
    /// threads run in ([`GpuBatchNorm::set_subgroup_merges`]), or 0 for
    /// merges through workgroup memory.
    fn subgroup_merge(&self, t: u32) -> u32 {
        let info = self.ctx.adapter_info();
        let wanted = self.subgroup_merges.unwrap_or_else(|| cpu_vulkan(info));
        match fixed_subgroup_size(info, self.ctx.features()) {
            Some(sg) if wanted && t.is_multiple_of(sg) => sg,
            _ => 0,
        }
    }

    /// The grid of the single pass `op` of `plan` with the kernels `e`,
    /// when it runs in one pass. The key's fusion is the plan's
    /// `FLAG_RESIDUAL` and `FLAG_RELU`.
    pub(super) fn single_grid(
        &self,
        plan: &Plan,
        e: &ElementKernels,
        op: SingleOp,
    ) -> Option<SingleGrid> {
        if self.single_pass == Some(false)
            || plan.chunks.len() != 1
            || !binds_single(self.ctx.limits(), op == SingleOp::Backward)
        {
            return None;
        }
        let p = &plan.chunks[0].p;
        let cpu = self.ctx.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let aim = if cpu { K_AIM_CPU } else { K_AIM };
        let mut grid = SingleGrid::new(p.outer, p.channels, p.inner, aim)?;
        grid.key.fused = p.flags & (FLAG_RESIDUAL | FLAG_RELU);
        grid.key.op = op;
        // one workgroup counts the batch and finishes its channels itself
        grid.key.alone = op == SingleOp::Train && grid.workgroups == 1;
        if op != SingleOp::Eval {
            grid.key.subgroup = self.subgroup_merge(grid.key.t);
        }
        let scalar = grid.key.items == SingleKey::SCALAR;
        if op != SingleOp::Train && scalar {
            // the single-pass evaluation and backward have vec4 items only
            return None;
        }
        if scalar && e.storage == crate::shaders::Storage::F16Packed {
            // single elements cannot be written into shared words
            return None;
        }
        let elements = u64::from(p.outer) * u64::from(p.channels) * u64::from(p.inner);
        // measured on the CPU adapters: the training forward of single
        // elements and the evaluation forward ran slower in one pass than in
        // passes; from the running statistics the backward's passes may skip
        // the sums and need no x (no affine, no fusion): one pass only where
        // it saves dispatches
        let batch_op = !scalar
            && match op {
                SingleOp::Train => true,
                SingleOp::Eval => false,
                SingleOp::Backward => p.flags & FLAG_BATCH_STATS != 0,
            };
        let large_pays = batch_op && cpu_vulkan(self.ctx.adapter_info());
        let mid_pays = batch_op && cpu && elements <= MID_TENSOR_CPU;
        let chosen =
            self.single_pass == Some(true) || elements <= SMALL_TENSOR || mid_pays || large_pays;
        chosen.then_some(grid)
    }

    /// The pipeline of `grid`, or the error naming `what` for a key that has
    /// none (see [`ElementKernels::single`]).
    fn single_kernel(
        &self,
        e: &ElementKernels,
        grid: SingleGrid,
        what: &str,
    ) -> Result<std::sync::Arc<Kernel>> {
        e.single(self.ctx.device(), grid.key)?
            .ok_or_else(|| Error::Unsupported {
                adapter: self.ctx.label(),
                what: what.into(),
            })
    }

    /// Finishes a single-pass forward (`shaders/single_finalize.wgsl`, one
    /// workgroup): counts the batch (with `FLAG_UPDATE_RUNNING` in the
    /// parameters), writes the saved statistics and moves the running ones.
    pub(super) fn single_finalize<'k>(
        &mut self,
        k: &'k Kernel,
        params: &wgpu::Buffer,
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        let state = self.state.clone();
        let bindings = [Self::whole(params), Self::whole(&state), Self::whole(saved)];
        self.group(k, &bindings, 1)
    }

    /// The single pass (`shaders/forward_single.wgsl`, or
    /// `forward_single_scalar.wgsl` for items of single elements): `y =
    /// act(BN(x) + z)`, and each channel's `(K, d, var)` into `saved` for
    /// [`GpuBatchNorm::single_finalize`], or, for a grid of one workgroup
    /// (`key.alone`), the batch counted and the saved and running
    /// statistics written as that pass would. With [`SingleOp::Eval`] the
    /// evaluation forward from the running statistics instead (the saved
    /// statistics of `eval_coeffs`). Without `z` the pass binds `x` in its
    /// place and does not read it.
    pub(super) fn forward_single<'k>(
        &mut self,
        e: &ElementKernels,
        grid: SingleGrid,
        params: &wgpu::Buffer,
        (x, z, y): (&GpuTensor, Option<&GpuTensor>, &GpuTensor),
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        // single_grid never picks items of single elements for packed f16
        let what = "the single-pass forward of single elements in packed f16 words";
        let kernel = self.single_kernel(e, grid, what)?;
        let state = self.state.clone();
        let bindings = [
            Self::whole(params),
            x.binding(),
            Self::whole(&state),
            Self::whole(saved),
            y.binding(),
            z.unwrap_or(x).binding(),
        ];
        self.group(kernel, &bindings, grid.workgroups)
    }

    /// The single-pass backward with batch statistics
    /// (`shaders/backward_single.wgsl`): `dx`, `dweight` and `dbias` of
    /// the upstream gradient `dy`, gated by `y` with `FLAG_RELU` in the
    /// grid's fusion and written into `dz` with `FLAG_RESIDUAL`. Stand-ins
    /// fill the slots of `y` (`x`) and `dz` (the scratch buffer) where the
    /// fusion leaves them unread.
    pub(super) fn backward_single<'k>(
        &mut self,
        e: &ElementKernels,
        grid: SingleGrid,
        params: &wgpu::Buffer,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        (y, dz): (Option<&GpuTensor>, Option<&GpuTensor>),
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        // single_grid never picks items of single elements for the backward
        let what = "the single-pass backward of single elements";
        let kernel = self.single_kernel(e, grid, what)?;
        let (state, scratch) = (self.state.clone(), self.scratch.clone());
        let bindings = [
            Self::whole(params),
            x.binding(),
            Self::whole(&state),
            Self::whole(saved),
            dx.binding(),
            dy.binding(),
            y.unwrap_or(x).binding(),
            dz.map_or_else(|| Self::whole(&scratch), GpuTensor::binding),
        ];
        self.group(kernel, &bindings, grid.workgroups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(items: u32, t: u32, k: u32) -> SingleKey {
        SingleKey {
            op: SingleOp::Train,
            items,
            t,
            k,
            fused: 0,
            alone: false,
            subgroup: 0,
        }
    }

    #[test]
    fn groups_take_about_k_aim_items_per_thread() {
        // 32x1024x14x14 NCHW: 1568 vec4s a channel, 128 threads of 13
        let g = SingleGrid::new(32, 1024, 196, K_AIM).unwrap();
        assert_eq!(g.key, key(0, 128, 13));
        assert_eq!(g.workgroups, 512);
        // 32x512x28x28: 6272 vec4s, past 16 * 256: 256 threads of 25
        let g = SingleGrid::new(32, 512, 784, K_AIM).unwrap();
        assert_eq!(g.key, key(0, 256, 25));
        // 32x2048x7x7 NCHW: four channels' runs of 49, 1568 vec4s a group of
        // four channels, 128 threads of 13
        let g = SingleGrid::new(32, 2048, 49, K_AIM).unwrap();
        assert_eq!(g.key, key(3, 128, 13));
        assert_eq!(g.workgroups, 256);
        // C not a multiple of 4: single elements, 392 items of four, 32 threads of 13
        let g = SingleGrid::new(32, 2047, 49, K_AIM).unwrap();
        assert_eq!(g.key, key(2, 32, 13));
        assert_eq!(g.workgroups, 256);
        // runs of 2: single elements
        assert_eq!(SingleGrid::new(32, 8, 2, K_AIM).unwrap().key.items, 2);
        // (N, C) = 4096x1024: four channels a lane, 4096 items, 256 threads of 16
        let g = SingleGrid::new(4096, 1024, 1, K_AIM).unwrap();
        assert_eq!(g.key, key(1, 256, 16));
        assert_eq!(g.workgroups, 256);
        // tiny channels: 16 threads of one item, 16 channels a workgroup
        let g = SingleGrid::new(2, 3, 2, K_AIM).unwrap();
        assert_eq!(g.key, key(2, 16, 1));
        assert_eq!(g.workgroups, 1);
        // on a CPU adapter about 32: 32x1024x14x14 in 64 threads of 25
        let g = SingleGrid::new(32, 1024, 196, K_AIM_CPU).unwrap();
        assert_eq!(g.key, key(0, 64, 25));
        assert_eq!(g.workgroups, 256);
    }

    #[test]
    fn channels_past_what_registers_hold_take_the_passes() {
        // 32x64x56x56: 100352 elements a channel
        assert_eq!(SingleGrid::new(32, 64, 3136, K_AIM_CPU), None);
        // the largest channel that fits, and one vec4 more
        assert!(SingleGrid::new(1, 1, 32 * 4 * 256, K_AIM).is_some());
        assert_eq!(SingleGrid::new(1, 1, 32 * 4 * 256 + 4, K_AIM), None);
    }
}

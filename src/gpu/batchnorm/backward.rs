//! Backward, plain or of a fused forward: the passes `backward_partial`,
//! `backward_finalize` and `backward_dx`, and the recorded operation built
//! from them.
//!
//! A fused backward rides on the same passes: its reductions (the `_gated`
//! variants of `backward_partial`) gate `dy` by the fused output `y` and
//! write the gated `dy` out, into `dz` with a residual or into `dx` as
//! scratch, and the `dx` pass reads it back from there (from `dx` itself in
//! the `_in_place` variants of `backward_dx`): one pass reading `x`, `dy` and
//! `y`, one reading `x` and the gated `dy`.

use super::plan::Chunk;
use super::storage::elements;
use super::{GpuBatchNorm, GpuSavedStats, Pass};
use crate::error::{Error, Result};
use crate::fused::{Activation, Fusion};
use crate::gpu::kernels::{Kernel, Params};
use crate::gpu::pipelines::{self, ElementKernels, FusedKernels, SingleOp};
use crate::gpu::tensor::GpuTensor;
use crate::shaders::{FLAG_BATCH_STATS, FLAG_RELU, FLAG_RESIDUAL, WG_CHANNEL};
use crate::shape::ChannelWalk;
use crate::validate;

/// What a backward of a fused forward adds to the plain one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gate<'a> {
    /// The fused forward's output (the ReLU's mask).
    pub y: &'a GpuTensor,
    /// What the forward fused.
    pub fusion: Fusion,
    /// Where the residual's gradient goes (with `fusion.residual`).
    pub dz: Option<&'a GpuTensor>,
}

impl Gate<'_> {
    /// Whether the backward differs from the plain one.
    fn fused(&self) -> bool {
        self.fusion != Fusion::default()
    }
}

impl GpuBatchNorm {
    /// Backward, stage 1 (`shaders/backward_partial.wgsl`, or
    /// `backward_partial_vec4.wgsl` when the reduction reads vec4s; on the
    /// grid of [`super::grid::ReduceGrid`]; [`crate::reference::backward_partial`]): `S1 = sum(dy)` and
    /// `S2 = sum(dy * (x - mean))` of each slice of each channel into the
    /// partials buffer, with the mean the forward saved. With `gated =
    /// Some((y, out))` the gated variant (`backward_partial_gated`,
    /// `shaders/upstream_gated.wgsl`) sums the `dy` gated by `y` (with
    /// `FLAG_RELU`) instead, and writes it into `out`.
    pub(super) fn backward_partial<'k>(
        &mut self,
        e: &'k ElementKernels,
        chunk: &Chunk,
        (x, dy, saved): (&GpuTensor, &GpuTensor, &wgpu::Buffer),
        gated: Option<(&GpuTensor, &GpuTensor)>,
    ) -> Result<Pass<'k>> {
        let (vec4, wgs) = chunk.reduce;
        let params = self.cache.params(&self.ctx, &chunk.p)?;
        let scratch = self.scratch.clone();
        let (first, len) = (chunk.first, chunk.len);
        let [a, b, c, d, f] = [
            Self::whole(&params),
            x.range_binding(first, len),
            dy.range_binding(first, len),
            Self::whole(saved),
            Self::whole(&scratch),
        ];
        match gated {
            None => self.group(e.backward_partial(vec4), &[a, b, c, d, f], wgs),
            Some((y, out)) => {
                let k = self.fused_kernels(e)?.backward_partial_gated(vec4);
                let bindings = [
                    a,
                    b,
                    c,
                    d,
                    f,
                    y.range_binding(first, len),
                    out.range_binding(first, len),
                ];
                self.group(k, &bindings, wgs)
            }
        }
    }

    /// The kernels of a fused backward, or the error of a device that cannot
    /// bind its reductions.
    fn fused_kernels<'k>(&self, e: &'k ElementKernels) -> Result<&'k FusedKernels> {
        e.fused.as_ref().ok_or_else(|| Error::Unsupported {
            adapter: self.ctx.label(),
            what: format!(
                "a fused backward needs {} storage buffers per shader stage (max_storage_buffers_per_shader_stage) and {} bindings per bind group; the device was opened with {} and {}",
                pipelines::GATED_STORAGE_BUFFERS,
                pipelines::GATED_STORAGE_BUFFERS + 1,
                self.ctx.limits().max_storage_buffers_per_shader_stage,
                self.ctx.limits().max_bindings_per_bind_group,
            ),
        })
    }

    /// Backward, stage 2 (`shaders/backward_finalize.wgsl`,
    /// [`crate::reference::backward_finalize`]): per channel, sums the slices
    /// into the layer's `dweight`, `dbias` and the coefficients of
    /// [`GpuBatchNorm::backward_dx`].
    fn backward_finalize<'k>(
        &mut self,
        k: &'k Kernel,
        (params, p): (&wgpu::Buffer, &Params),
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        let (scratch, state, coef) = (self.scratch.clone(), self.state.clone(), self.coef.clone());
        let bindings = [
            Self::whole(params),
            Self::whole(&scratch),
            Self::whole(saved),
            Self::whole(&state),
            Self::whole(&coef),
        ];
        self.group(k, &bindings, p.channels.div_ceil(WG_CHANNEL))
    }

    /// Backward, stage 3 (`shaders/backward_dx.wgsl`, or
    /// `backward_dx_vec4.wgsl` when a row of `C * inner` elements is a
    /// multiple of 4; on the grid of [`super::grid::ElementGrid`];
    /// [`crate::reference::backward_dx`]): `dx = a*dy + b*(x - mean) + c`;
    /// threads whose channels all have `b = 0` (running statistics) leave `x`
    /// unread. `in_place` (a fused backward without a residual): the variant
    /// `backward_dx_in_place` reads the upstream gradient from `dx`, where
    /// the gated reduction left it, instead of `dy`.
    pub(super) fn backward_dx<'k>(
        &mut self,
        e: &'k ElementKernels,
        chunk: &Chunk,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        in_place: bool,
    ) -> Result<Pass<'k>> {
        let (vec4, wgs) = chunk.elements;
        let params = self.cache.params(&self.ctx, &chunk.p)?;
        let coef = self.coef.clone();
        let (first, len) = (chunk.first, chunk.len);
        let bindings = [
            Self::whole(&params),
            x.range_binding(first, len),
            dy.range_binding(first, len),
            Self::whole(&coef),
            dx.range_binding(first, len),
        ];
        let k = if in_place {
            self.fused_kernels(e)?.backward_dx_in_place(vec4)
        } else {
            e.backward_dx(vec4)
        };
        self.group(k, &bindings, wgs)
    }

    /// Checks the tensors of a backward, of a fused forward with `gate`;
    /// the walk of `x`.
    fn check_backward(
        &self,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        saved: &wgpu::Buffer,
        gate: Option<&Gate<'_>>,
    ) -> Result<ChannelWalk> {
        self.check_tensor("x", x)?;
        self.check_tensor("dy", dy)?;
        let walk = validate::backward_input(&self.config, x.shape(), dy.shape())?;
        validate::dtype("dy", x.dtype(), dy.dtype())?;
        if let Some(g) = gate {
            self.check_input_like("y", g.y, x)?;
        }
        self.check_output("dx", dx, &walk.dims, x.dtype())?;
        let dz = match gate {
            Some(g) => check_dz(g)?,
            None => None,
        };
        if let Some(dz) = dz {
            self.check_output("dz", dz, &walk.dims, x.dtype())?;
        }
        let e = elements(&self.ctx, x.dtype(), self.packed_f16)?;
        if gate.is_some_and(Gate::fused) {
            self.fused_kernels(e)?;
        }
        let mut inputs = vec![("x", x), ("dy", dy)];
        inputs.extend(gate.map(|g| ("y", g.y)));
        self.check_buffers(("dx", dx), &inputs, saved)?;
        if let Some(dz) = dz {
            inputs.push(("dx", dx));
            self.check_buffers(("dz", dz), &inputs, saved)?;
        }
        Ok(walk)
    }

    /// Records the passes of a backward whose forward saved `saved`, of a
    /// fused forward with `gate`.
    fn record_backward_passes(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        walk: &ChannelWalk,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        (saved, batch): (&wgpu::Buffer, bool),
        before: Option<Pass<'_>>,
        gate: Option<Gate<'_>>,
    ) -> Result<()> {
        let ctx = self.ctx.clone();
        let e = elements(&ctx, x.dtype(), self.packed_f16)?;
        let mut flags = if batch { FLAG_BATCH_STATS } else { 0 };
        // The fused backward's reductions write the gated dy into dz, which
        // the dx pass then reads as its dy, or into dx, which it reads back
        // in place (dy stays bound, unread).
        let (mut gated, mut upstream, mut in_place) = (None, dy, false);
        if let Some(g) = gate.filter(Gate::fused) {
            if g.fusion.activation == Activation::Relu {
                flags |= FLAG_RELU;
            }
            // FLAG_RESIDUAL: read by the single pass alone (it writes dz)
            match g.dz {
                Some(dz) => (upstream, flags) = (dz, flags | FLAG_RESIDUAL),
                None => in_place = true,
            }
            gated = Some((g.y, g.dz.unwrap_or(dx)));
        }
        let plan = self.plan(walk, x.dtype(), flags)?;
        if let Some(grid) = self.single_grid(&plan, e, SingleOp::Backward) {
            let (y, dz) = gate
                .filter(Gate::fused)
                .map_or((None, None), |g| (Some(g.y), g.dz));
            let params = self.cache.params(&self.ctx, &plan.chunks[0].p)?;
            let mut passes: Vec<Pass<'_>> = before.into_iter().collect();
            passes.push(self.backward_single(e, grid, &params, (x, dy, dx), (y, dz), saved)?);
            self.record(enc, "batchnorm.backward", &passes);
            return Ok(());
        }
        let p = plan.whole;
        let params = self.prepare(&p)?;
        let k = &ctx.kernels().backward_finalize;
        let mut passes: Vec<Pass<'_>> = before.into_iter().collect();
        if batch || self.config.affine || gated.is_some() {
            for chunk in &plan.chunks {
                passes.push(self.backward_partial(e, chunk, (x, dy, saved), gated)?);
            }
            passes.push(self.backward_finalize(k, (&params, &p), saved)?);
        } else {
            // Running statistics and no dweight: dx = dy * weight * invstd
            // needs no sums, so the finalize pass runs over zero slices.
            let p0 = Params { slices: 0, ..p };
            let params0 = self.prepare(&p0)?;
            passes.push(self.backward_finalize(k, (&params0, &p0), saved)?);
        }
        for chunk in &plan.chunks {
            passes.push(self.backward_dx(e, chunk, (x, upstream, dx), in_place)?);
        }
        self.record(enc, "batchnorm.backward", &passes);
        Ok(())
    }

    /// Records the backward of the forward that wrote `saved`: `dx` into
    /// `dx`, and `dweight`, `dbias` into the layer's gradient tensors
    /// ([`GpuBatchNorm::dweight`], [`GpuBatchNorm::dbias`]), which each
    /// backward overwrites. Nothing is submitted.
    ///
    /// ```text
    /// batch statistics (a training forward, or evaluation without tracking):
    ///   dbias = sum(dy), dweight = sum(dy (x - mean)) invstd
    ///   dx = weight invstd (dy - sum(dy)/M - (x - mean) invstd^2 sum(dy (x - mean))/M)
    /// running statistics (an evaluation forward with tracking):
    ///   dx = dy weight / sqrt(running_var + eps)
    /// ```
    ///
    /// # Errors
    /// Checked before anything is recorded: as
    /// [`GpuBatchNorm::record_forward_train`] for `x` and `dx`,
    /// [`crate::Error::ShapeMismatch`] or [`crate::Error::DTypeMismatch`]
    /// when `dy` differs from `x`, [`crate::Error::NoSavedStatistics`] when no
    /// forward wrote `saved`, [`crate::Error::SavedStatsMismatch`] when it
    /// belongs to another layer or to a forward of another shape.
    pub fn record_backward(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        dy: &GpuTensor,
        saved: &GpuSavedStats,
        dx: &GpuTensor,
    ) -> Result<()> {
        self.record_backward_of(enc, (x, dy, dx), saved, None)
    }

    /// Records the backward of a fused forward
    /// ([`GpuBatchNorm::record_forward_train_fused`] or
    /// [`GpuBatchNorm::record_forward_eval_fused`]) that wrote `saved` and
    /// output `y`: the upstream gradient `dy` gated by the activation (for
    /// the ReLU zero where `y <= 0`, a NaN `y` letting `dy` through, as
    /// PyTorch's `threshold_backward`), written into `dz` when
    /// `fusion.residual`, then the backward of
    /// [`GpuBatchNorm::record_backward`] of the gated `dy`: `dx` into `dx`,
    /// `dweight` and `dbias` into the layer's gradient tensors. Nothing is
    /// submitted. With `Fusion::default()` it is the plain backward.
    ///
    /// ```text
    /// g  = dy where y > 0 or y is NaN, else 0     (ReLU; g = dy for the identity)
    /// dz = g                                      (with a residual)
    /// dx, dweight, dbias = the plain backward of g
    /// ```
    ///
    /// The gated `dy` is written as the reduction reads it: into `dz`, or
    /// into `dx` as scratch that the `dx` pass reads back, so that the
    /// backward reads `x`, `dy` and `y` once and `x` and the gated `dy`
    /// once ([`crate::FusedOp::ideal_bytes_per_element`]).
    ///
    /// # Errors
    /// Checked before anything is recorded, leaving encoder and layer as
    /// they were: as [`GpuBatchNorm::record_backward`], and for `y` and `dz`
    /// [`crate::Error::DeviceMismatch`], [`crate::Error::LayoutMismatch`],
    /// [`crate::Error::ShapeMismatch`] or [`crate::Error::DTypeMismatch`]
    /// when they differ from `x`, [`crate::Error::BufferAlias`] when `dz`
    /// shares a buffer with another tensor of the call,
    /// [`crate::Error::FusedGradient`] for a missing `dz` with
    /// `fusion.residual` or a `dz` without it, and
    /// [`crate::Error::Unsupported`] for a fused backward on a device opened
    /// with fewer than 6 storage buffers per shader stage (its reductions
    /// bind `x`, `dy`, `y`, the gated `dy`, the saved statistics and the partial sums).
    #[allow(clippy::too_many_arguments)]
    pub fn record_backward_fused(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
        dy: &GpuTensor,
        fusion: Fusion,
        saved: &GpuSavedStats,
        dx: &GpuTensor,
        dz: Option<&GpuTensor>,
    ) -> Result<()> {
        let gate = Gate { y, fusion, dz };
        self.record_backward_of(enc, (x, dy, dx), saved, Some(gate))
    }

    /// Records the backward of the forward that wrote `saved`, of a fused
    /// forward with `gate`.
    pub(super) fn record_backward_of(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        saved: &GpuSavedStats,
        gate: Option<Gate<'_>>,
    ) -> Result<()> {
        let walk = self.check_backward((x, dy, dx), &saved.buffer, gate.as_ref())?;
        let batch = saved.check_backward(self.id, &walk.dims)?.batch;
        let tensors = (x, dy, dx);
        self.record_backward_passes(enc, &walk, tensors, (&saved.buffer, batch), None, gate)
    }

    /// Records the backward of an evaluation forward with tracked statistics
    /// from the running statistics as they are when the commands run, of a
    /// fused forward with `gate`.
    pub(super) fn record_backward_running(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        (x, dy, dx): (&GpuTensor, &GpuTensor, &GpuTensor),
        gate: Option<Gate<'_>>,
    ) -> Result<()> {
        let own = self.own_buffer();
        let walk = self.check_backward((x, dy, dx), &own, gate.as_ref())?;
        let ctx = self.ctx.clone();
        let p = self.plan(&walk, x.dtype(), 0)?.whole;
        let params = self.prepare(&p)?;
        let coeffs = self.eval_coeffs(&ctx.kernels().eval_coeffs, (&params, &p), &own)?;
        let tensors = (x, dy, dx);
        self.record_backward_passes(enc, &walk, tensors, (&own, false), Some(coeffs), gate)
    }
}

/// The `dz` of a fused backward, which a residual needs and only a residual takes.
fn check_dz<'a>(g: &Gate<'a>) -> Result<Option<&'a GpuTensor>> {
    let why = match (g.fusion.residual, g.dz) {
        (true, None) => "the fusion adds a residual, whose gradient needs a dz tensor",
        (false, Some(_)) => "a dz tensor was given, but the fusion adds no residual",
        _ => return Ok(g.dz),
    };
    Err(Error::FusedGradient {
        fusion: g.fusion.name().into(),
        why: why.into(),
    })
}

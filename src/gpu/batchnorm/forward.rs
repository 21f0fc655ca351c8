//! Training and evaluation forward, plain or fused with the residual add
//! and ReLU after them: the passes `stats_partial`, `stats_finalize`,
//! `eval_coeffs` and `normalize`, and the recorded operations built from them.

use super::plan::{Chunk, Plan};
use super::storage::elements;
use super::{GpuBatchNorm, GpuSavedStats, Pass, saved::Written};
use crate::config::Mode;
use crate::error::Result;
use crate::fused::Activation;
use crate::gpu::kernels::Params;
use crate::gpu::pipelines::{ElementKernels, SingleOp};
use crate::gpu::tensor::GpuTensor;
use crate::shaders::{FLAG_RELU, FLAG_RESIDUAL, FLAG_UPDATE_RUNNING, WG_CHANNEL};
use crate::shape::ChannelWalk;
use crate::validate;

impl GpuBatchNorm {
    /// Training statistics, stage 1 (`shaders/stats_partial.wgsl`, or
    /// `stats_partial_vec4.wgsl` when the reduction reads vec4s; on the grid
    /// of [`super::grid::ReduceGrid`]; [`crate::reference::stats_partial`]):
    /// Welford `(mean, M2)` of each slice of each channel of `x` into the
    /// partials buffer; with
    /// `FLAG_UPDATE_RUNNING` also counts the batch and stores the step's momentum.
    pub(super) fn stats_partial<'k>(
        &mut self,
        e: &'k ElementKernels,
        chunk: &Chunk,
        x: &GpuTensor,
    ) -> Result<Pass<'k>> {
        let (vec4, wgs) = chunk.reduce;
        let params = self.cache.params(&self.ctx, &chunk.p)?;
        let (scratch, state) = (self.scratch.clone(), self.state.clone());
        let bindings = [
            Self::whole(&params),
            x.range_binding(chunk.first, chunk.len),
            Self::whole(&scratch),
            Self::whole(&state),
        ];
        self.group(e.stats_partial(vec4), &bindings, wgs)
    }

    /// Training statistics, stage 2 (`shaders/stats_finalize.wgsl`,
    /// [`crate::reference::stats_finalize`]): per channel, Chan-merges the
    /// slices into the saved `(K, d, invstd)` (mean `K + d`) and the coefficients of
    /// [`GpuBatchNorm::normalize`], and (with `FLAG_UPDATE_RUNNING`) updates
    /// the running statistics in place.
    fn stats_finalize<'k>(
        &mut self,
        k: &'k crate::gpu::kernels::Kernel,
        (params, p): (&wgpu::Buffer, &Params),
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        let (scratch, state, coef) = (self.scratch.clone(), self.state.clone(), self.coef.clone());
        let bindings = [
            Self::whole(params),
            Self::whole(&scratch),
            Self::whole(&state),
            Self::whole(saved),
            Self::whole(&coef),
        ];
        self.group(k, &bindings, p.channels.div_ceil(WG_CHANNEL))
    }

    /// Evaluation coefficients (`shaders/eval_coeffs.wgsl`,
    /// [`crate::reference::eval_coeffs`]) from the running statistics, and
    /// the `(running_mean, invstd)` a backward of this forward uses.
    pub(super) fn eval_coeffs<'k>(
        &mut self,
        k: &'k crate::gpu::kernels::Kernel,
        (params, p): (&wgpu::Buffer, &Params),
        saved: &wgpu::Buffer,
    ) -> Result<Pass<'k>> {
        let (state, coef) = (self.state.clone(), self.coef.clone());
        let bindings = [
            Self::whole(params),
            Self::whole(&state),
            Self::whole(saved),
            Self::whole(&coef),
        ];
        self.group(k, &bindings, p.channels.div_ceil(WG_CHANNEL))
    }

    /// The elementwise pass (`shaders/normalize.wgsl`, or
    /// `normalize_vec4.wgsl` when a row of `C * inner` elements is a multiple
    /// of 4; on the grid of [`super::grid::ElementGrid`];
    /// [`crate::reference::normalize`]): `y = (x - center) * scale + shift`
    /// with the per-channel coefficients of the pass before; fused
    /// (`FLAG_RESIDUAL`, `FLAG_RELU` in the chunk's flags), `y = act(that + z)`.
    /// Without `z` the pass binds `x` in its place and does not read it.
    fn normalize<'k>(
        &mut self,
        e: &'k ElementKernels,
        chunk: &Chunk,
        (x, z, y): (&GpuTensor, Option<&GpuTensor>, &GpuTensor),
    ) -> Result<Pass<'k>> {
        let (vec4, wgs) = chunk.elements;
        let params = self.cache.params(&self.ctx, &chunk.p)?;
        let coef = self.coef.clone();
        let (first, len) = (chunk.first, chunk.len);
        let bindings = [
            Self::whole(&params),
            x.range_binding(first, len),
            Self::whole(&coef),
            y.range_binding(first, len),
            z.unwrap_or(x).range_binding(first, len),
        ];
        self.group(e.normalize(vec4), &bindings, wgs)
    }

    /// The normalize passes of every chunk of `plan`, adding `z` when given.
    pub(super) fn normalize_all<'k>(
        &mut self,
        e: &'k ElementKernels,
        plan: &Plan,
        (x, z, y): (&GpuTensor, Option<&GpuTensor>, &GpuTensor),
        passes: &mut Vec<Pass<'k>>,
    ) -> Result<()> {
        for chunk in &plan.chunks {
            passes.push(self.normalize(e, chunk, (x, z, y))?);
        }
        Ok(())
    }

    /// Checks a forward of `x` (plus `z`) into `y` with `saved`; the walk
    /// of `x` and the buffer the statistics go to (`saved`'s, or the layer's own).
    fn check_forward(
        &self,
        (x, z, y): (&GpuTensor, Option<&GpuTensor>, &GpuTensor),
        saved: Option<&GpuSavedStats>,
        batch: bool,
    ) -> Result<(ChannelWalk, wgpu::Buffer)> {
        self.check_tensor("x", x)?;
        let walk = validate::input(&self.config, x.shape(), batch)?;
        if let Some(z) = z {
            self.check_input_like("z", z, x)?;
        }
        self.check_output("y", y, &walk.dims, x.dtype())?;
        elements(&self.ctx, x.dtype(), self.packed_f16)?;
        if let Some(s) = saved {
            s.check_layer(self.id)?;
        }
        let saved_buffer = saved.map_or_else(|| self.own_buffer(), |s| s.buffer.clone());
        let inputs: Vec<(&str, &GpuTensor)> =
            [("x", x)].into_iter().chain(z.map(|z| ("z", z))).collect();
        self.check_buffers(("y", y), &inputs, &saved_buffer)?;
        Ok((walk, saved_buffer))
    }

    /// The saved-statistics buffer of forwards given no handle.
    pub(super) fn own_buffer(&self) -> wgpu::Buffer {
        self.own_saved
            .as_ref()
            .expect("own_saved is set in new")
            .buffer
            .clone()
    }

    /// Records a forward with batch statistics, fused with `z` and
    /// `activation`; `update` moves the running statistics.
    fn record_batch_forward(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        (x, z, y): (&GpuTensor, Option<&GpuTensor>, &GpuTensor),
        activation: Activation,
        saved: Option<&mut GpuSavedStats>,
        update: bool,
    ) -> Result<()> {
        let (walk, saved_buffer) = self.check_forward((x, z, y), saved.as_deref(), true)?;
        // a backward of this forward is the layer's own, not a synchronized one
        self.sync = None;
        let ctx = self.ctx.clone();
        let e = elements(&ctx, x.dtype(), self.packed_f16)?;
        let flags = if update { FLAG_UPDATE_RUNNING } else { 0 } | fused_flags(z, activation);
        let plan = self.plan(&walk, x.dtype(), flags)?;
        if let Some(grid) = self.single_grid(&plan, e, SingleOp::Train) {
            let params = self.cache.params(&self.ctx, &plan.chunks[0].p)?;
            let mut passes =
                vec![self.forward_single(e, grid, &params, (x, z, y), &saved_buffer)?];
            if !grid.key.alone {
                passes.push(self.single_finalize(
                    &ctx.kernels().single_finalize,
                    &params,
                    &saved_buffer,
                )?);
            }
            self.finish_batch_forward(enc, &passes, update, saved, walk);
            return Ok(());
        }
        let p = plan.whole;
        let params = self.prepare(&p)?;
        let mut passes = Vec::with_capacity(2 * plan.chunks.len() + 1);
        for chunk in &plan.chunks {
            passes.push(self.stats_partial(e, chunk, x)?);
        }
        passes.push(self.stats_finalize(
            &ctx.kernels().stats_finalize,
            (&params, &p),
            &saved_buffer,
        )?);
        self.normalize_all(e, &plan, (x, z, y), &mut passes)?;
        self.finish_batch_forward(enc, &passes, update, saved, walk);
        Ok(())
    }

    /// Records the passes of a forward with batch statistics and notes in
    /// `saved` what they write.
    fn finish_batch_forward(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        passes: &[Pass<'_>],
        update: bool,
        saved: Option<&mut GpuSavedStats>,
        walk: ChannelWalk,
    ) {
        let label = if update {
            "batchnorm.forward_train"
        } else {
            "batchnorm.forward_eval"
        };
        self.record(enc, label, passes);
        mark_written(saved, walk.dims, true);
    }

    /// Records a training forward of `x` into `y`: normalizes with the batch
    /// statistics, saves them into `saved` (for the backward of this
    /// forward), and, when tracked, moves the running statistics and
    /// `num_batches_tracked` when the commands run. Nothing is submitted.
    ///
    /// ```text
    /// y = (x - mean) / sqrt(var + eps) * weight + bias      (var biased)
    /// running_mean = (1-m) running_mean + m mean
    /// running_var  = (1-m) running_var  + m var M/(M-1)
    /// ```
    ///
    /// # Errors
    /// Checked before anything is recorded, leaving encoder and layer as
    /// they were: [`crate::Error::DeviceMismatch`],
    /// [`crate::Error::LayoutMismatch`], [`crate::Error::Rank`],
    /// [`crate::Error::ChannelMismatch`], [`crate::Error::Empty`],
    /// [`crate::Error::SingleValuePerChannel`], [`crate::Error::ShapeMismatch`]
    /// and [`crate::Error::DTypeMismatch`] for `y`,
    /// [`crate::Error::BufferAlias`], [`crate::Error::SavedStatsMismatch`]
    /// for a handle of another layer, [`crate::Error::Unsupported`] for f16
    /// on a device without f16 kernels (see
    /// [`GpuBatchNorm::set_storage_dtype`]), [`crate::Error::TooLarge`], and
    /// [`crate::Error::Wgpu`] when the first use of a buffer fails to bind.
    pub fn record_forward_train(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
        saved: Option<&mut GpuSavedStats>,
    ) -> Result<()> {
        self.record_forward_train_fused(enc, x, None, Activation::Identity, y, saved)
    }

    /// Records a fused training forward `y = act(BN(x) + z)`: the BatchNorm
    /// exactly as [`GpuBatchNorm::record_forward_train`] (batch statistics
    /// saved, running statistics moved), then the residual `z` added when
    /// given, then `activation`, all in the normalize pass. Nothing is
    /// submitted. Without `z` and with [`Activation::Identity`] it is the
    /// plain training forward.
    ///
    /// ```text
    /// y = act((x - mean) / sqrt(var + eps) * weight + bias + z)
    /// ```
    ///
    /// # Errors
    /// Checked before anything is recorded, leaving encoder and layer as
    /// they were: as [`GpuBatchNorm::record_forward_train`], and for `z`
    /// [`crate::Error::DeviceMismatch`], [`crate::Error::LayoutMismatch`],
    /// [`crate::Error::ShapeMismatch`] or [`crate::Error::DTypeMismatch`]
    /// when it differs from `x`, [`crate::Error::BufferAlias`] when it shares
    /// `y`'s buffer.
    pub fn record_forward_train_fused(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        z: Option<&GpuTensor>,
        activation: Activation,
        y: &GpuTensor,
        saved: Option<&mut GpuSavedStats>,
    ) -> Result<()> {
        let update = self.config.track_running_stats;
        self.record_batch_forward(enc, (x, z, y), activation, saved, update)
    }

    /// Records an evaluation forward of `x` into `y`: normalizes with the
    /// running statistics, or with batch statistics (running statistics
    /// untouched) when they are not tracked. `saved`, when given, receives
    /// the statistics a backward of this forward needs.
    ///
    /// ```text
    /// y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
    /// ```
    ///
    /// # Errors
    /// As [`GpuBatchNorm::record_forward_train`]; one value per channel is an
    /// error only without tracked statistics.
    pub fn record_forward_eval(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
        saved: Option<&mut GpuSavedStats>,
    ) -> Result<()> {
        self.record_forward_eval_fused(enc, x, None, Activation::Identity, y, saved)
    }

    /// Records a fused evaluation forward `y = act(BN(x) + z)`: the
    /// BatchNorm exactly as [`GpuBatchNorm::record_forward_eval`], then the
    /// residual `z` added when given, then `activation`, all in the
    /// normalize pass. Nothing is submitted.
    ///
    /// ```text
    /// y = act((x - running_mean) / sqrt(running_var + eps) * weight + bias + z)
    /// ```
    ///
    /// # Errors
    /// As [`GpuBatchNorm::record_forward_train_fused`]; one value per channel
    /// is an error only without tracked statistics.
    pub fn record_forward_eval_fused(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        z: Option<&GpuTensor>,
        activation: Activation,
        y: &GpuTensor,
        saved: Option<&mut GpuSavedStats>,
    ) -> Result<()> {
        if validate::uses_batch_stats(&self.config, Mode::Eval) {
            return self.record_batch_forward(enc, (x, z, y), activation, saved, false);
        }
        let (walk, saved_buffer) = self.check_forward((x, z, y), saved.as_deref(), false)?;
        let ctx = self.ctx.clone();
        let e = elements(&ctx, x.dtype(), self.packed_f16)?;
        let plan = self.plan(&walk, x.dtype(), fused_flags(z, activation))?;
        if let Some(grid) = self.single_grid(&plan, e, SingleOp::Eval) {
            let params = self.cache.params(&self.ctx, &plan.chunks[0].p)?;
            let pass = self.forward_single(e, grid, &params, (x, z, y), &saved_buffer)?;
            self.record(enc, "batchnorm.forward_eval", &[pass]);
            mark_written(saved, walk.dims, false);
            return Ok(());
        }
        let p = plan.whole;
        let params = self.prepare(&p)?;
        let mut passes =
            vec![self.eval_coeffs(&ctx.kernels().eval_coeffs, (&params, &p), &saved_buffer)?];
        self.normalize_all(e, &plan, (x, z, y), &mut passes)?;
        self.record(enc, "batchnorm.forward_eval", &passes);
        mark_written(saved, walk.dims, false);
        Ok(())
    }
}

/// The flags of the normalize pass of a forward fused with `z` and `activation`.
fn fused_flags(z: Option<&GpuTensor>, activation: Activation) -> u32 {
    let residual = if z.is_some() { FLAG_RESIDUAL } else { 0 };
    match activation {
        Activation::Identity => residual,
        Activation::Relu => residual | FLAG_RELU,
    }
}

/// Notes in `saved` (when given) what the forward just recorded wrote into it.
fn mark_written(saved: Option<&mut GpuSavedStats>, dims: Vec<usize>, batch: bool) {
    if let Some(s) = saved {
        s.written = Some(Written { dims, batch });
    }
}

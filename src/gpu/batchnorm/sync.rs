//! The GPU layer as a participant of a synchronized BatchNorm
//! ([`crate::sync`]). Its reduction passes give the local statistics and
//! gradient sums, read back per (channel, slice) and merged on the host in
//! f64; the merged statistics become coefficients on the host (with the CPU
//! reference's `stats_finalize` and `backward_finalize`) and the
//! elementwise passes run on the device. Each phase is one submit and a
//! wait: the exchange between them needs the host anyway.

use super::plan::Plan;
use super::storage::elements;
use super::{GpuBatchNorm, GpuGradients};
use crate::error::{Error, Result};
use crate::gpu::kernels::Params;
use crate::gpu::tensor::GpuTensor;
use crate::reference::{backward_finalize, stats_finalize};
use crate::shape::ChannelWalk;
use crate::state::BatchNormState;
use crate::stats::{Moments, update_running};
use crate::sync::{NOT_SYNCED, SyncPhases, global_count, part_walk};
use crate::validate;

/// What a synchronized forward keeps for its backward.
#[derive(Debug, Clone)]
pub(super) struct SyncSaved {
    dims: Vec<usize>,
    /// Values per channel over all ranks.
    count: usize,
    /// Batch mean and `1 / sqrt(var + eps)` of the whole batch.
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

/// Elements of a channel in partial slot `s` of `p` (`slice_count` in
/// shaders/common.wgsl).
fn slice_count(p: &Params, s: u32) -> u32 {
    let per_chunk = p.chunk_m.div_ceil(p.slice_len);
    let chunk = s / per_chunk;
    let m = p.chunk_m.min(p.per_channel - chunk * p.chunk_m);
    p.slice_len.min(m - (s - chunk * per_chunk) * p.slice_len)
}

/// PyTorch's mean of a channel that held non-finite values (the SEEN_* bits
/// of shaders/reduce.wgsl): +inf or -inf for one kind of infinity, else NaN.
fn non_finite_mean(seen: u32) -> f64 {
    match seen {
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        _ => f64::NAN,
    }
}

impl GpuBatchNorm {
    /// The walk of this rank's part `x` (`None` for zero samples), after the
    /// device, layout and dtype checks.
    fn part(&self, x: &GpuTensor) -> Result<Option<ChannelWalk>> {
        self.check_tensor("x", x)?;
        elements(&self.ctx, x.dtype(), self.packed_f16)?;
        part_walk(&self.config, x.shape())
    }

    /// Runs the reduction passes of `plan` over `x` (and `dy`, for the
    /// backward's) in one submit and reads back `floats` floats per partial
    /// slot of every channel.
    fn reduce_and_read(
        &mut self,
        plan: &Plan,
        x: &GpuTensor,
        dy: Option<&GpuTensor>,
        floats: usize,
    ) -> Result<Vec<f32>> {
        let ctx = self.ctx.clone();
        let e = elements(&ctx, x.dtype(), self.packed_f16)?;
        self.prepare(&plan.whole)?;
        let saved = self.own_buffer();
        ctx.run("batchnorm.sync.reduce", |enc| {
            let mut passes = Vec::with_capacity(plan.chunks.len());
            for chunk in &plan.chunks {
                passes.push(match dy {
                    None => self.stats_partial(e, chunk, x)?,
                    Some(dy) => self.backward_partial(e, chunk, (x, dy, &saved), None)?,
                });
            }
            self.record(enc, "batchnorm.sync.reduce", &passes);
            Ok(())
        })?;
        let slots = (plan.whole.channels * plan.whole.slices) as usize;
        ctx.read_f32(&self.scratch, 0, slots * floats)
    }

    /// The layer's weight and bias as f64 (1 and 0 without affine).
    fn affine_f64(&self, state: &BatchNormState) -> (Vec<f64>, Vec<f64>) {
        let c = self.config.num_features;
        let wide = |v: &Option<Vec<f32>>, d: f64| {
            v.as_ref()
                .map_or_else(|| vec![d; c], |v| v.iter().map(|&x| f64::from(x)).collect())
        };
        (wide(&state.weight, 1.0), wide(&state.bias, 0.0))
    }

    /// Checks `x` and `dy` of a synchronized backward: the walk of the part
    /// and what the synchronized forward of its shape kept.
    fn synced_part(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
    ) -> Result<(Option<ChannelWalk>, SyncSaved)> {
        let walk = self.part(x)?;
        self.check_tensor("dy", dy)?;
        validate::same_shape("dy", x.shape(), dy.shape())?;
        validate::dtype("dy", x.dtype(), dy.dtype())?;
        let synced = self
            .sync
            .as_ref()
            .filter(|s| s.dims == x.shape())
            .ok_or_else(|| Error::NoSavedStatistics {
                detail: NOT_SYNCED.into(),
            })?;
        Ok((walk, synced.clone()))
    }

    /// Writes per-channel vec4s into `buffer` (saved statistics or coefficients).
    fn write_vec4s(&self, buffer: &wgpu::Buffer, v: &[[f32; 4]]) {
        self.ctx
            .queue()
            .write_buffer(buffer, 0, bytemuck::cast_slice(v));
    }
}

impl SyncPhases for GpuBatchNorm {
    type Tensor<'a> = GpuTensor;
    type Output = GpuTensor;
    type Grads = GpuGradients;

    fn sync_config(&self) -> &crate::config::BatchNormConfig {
        &self.config
    }

    /// The statistics pass on the device, its partial slots read back and
    /// merged per channel in f64; `(0, 0, 0)` for a part with zero samples.
    /// Counts no batch.
    fn local_moments(&mut self, x: &GpuTensor) -> Result<Vec<Moments>> {
        let c = self.config.num_features;
        let Some(walk) = self.part(x)? else {
            return Ok(vec![Moments::default(); c]);
        };
        let plan = self.plan(&walk, x.dtype(), 0)?;
        let parts = self.reduce_and_read(&plan, x, None, 4)?;
        let p = plan.whole;
        let slices = p.slices as usize;
        Ok((0..c)
            .map(|ch| {
                (0..slices).fold(Moments::default(), |acc, s| {
                    let v = &parts[(ch * slices + s) * 4..][..4];
                    let n = f64::from(slice_count(&p, s as u32));
                    let seen = v[3] as u32;
                    let part = if seen == 0 {
                        Moments {
                            n,
                            mean: f64::from(v[2]) + f64::from(v[0]),
                            m2: f64::from(v[1]),
                        }
                    } else {
                        Moments {
                            n,
                            mean: non_finite_mean(seen),
                            m2: f64::NAN,
                        }
                    };
                    acc.merge(part)
                })
            })
            .collect())
    }

    /// Coefficients from the merged statistics on the host, the normalize
    /// pass on the device; the running statistics move with the global count.
    fn apply_moments(&mut self, x: &GpuTensor, global: &[Moments]) -> Result<GpuTensor> {
        let walk = self.part(x)?;
        let m = global_count(global, self.config.num_features)?;
        let plan = walk
            .as_ref()
            .map(|w| self.plan(w, x.dtype(), 0))
            .transpose()?;
        let y = GpuTensor::uninit_as(&self.ctx, x.shape(), x.layout(), x.dtype())?;
        let mut state = self.state()?;
        let (weight, bias) = self.affine_f64(&state);
        let stats = stats_finalize(global, self.config.eps, &weight, &bias);
        update_running(&mut state, &self.config, &stats.mean, &stats.var, m);
        // saved (K, d, invstd) with K the mean in f32 and d what it misses;
        // coefficients as stats_finalize.wgsl writes them
        let (mut saved, mut coef) = (Vec::new(), Vec::new());
        for ch in 0..self.config.num_features {
            let (mean, invstd) = (stats.mean[ch], stats.invstd[ch]);
            if mean.is_finite() && invstd.is_finite() {
                let k = mean as f32;
                let d = mean - f64::from(k);
                let scale = weight[ch] * invstd;
                saved.push([k, d as f32, invstd as f32, 0.0]);
                coef.push([k, scale as f32, (bias[ch] - d * scale) as f32, 0.0]);
            } else {
                saved.push([mean as f32, 0.0, f32::NAN, 0.0]);
                coef.push([mean as f32, f32::NAN, f32::NAN, 0.0]);
            }
        }
        self.set_state(&state)?;
        self.write_vec4s(&self.own_buffer(), &saved);
        self.write_vec4s(&self.coef, &coef);
        if let Some(plan) = plan {
            let ctx = self.ctx.clone();
            let e = elements(&ctx, x.dtype(), self.packed_f16)?;
            self.prepare(&plan.whole)?;
            ctx.run("batchnorm.sync.normalize", |enc| {
                let mut passes = Vec::with_capacity(plan.chunks.len());
                self.normalize_all(e, &plan, (x, None, &y), &mut passes)?;
                self.record(enc, "batchnorm.sync.normalize", &passes);
                Ok(())
            })?;
        }
        self.sync = Some(SyncSaved {
            dims: x.shape().to_vec(),
            count: m,
            mean: stats.mean,
            invstd: stats.invstd,
        });
        Ok(y)
    }

    /// The backward's reduction on the device around the saved K, read back
    /// and summed per channel in f64, then moved to the mean.
    fn local_grad_sums(&mut self, x: &GpuTensor, dy: &GpuTensor) -> Result<Vec<(f64, f64)>> {
        let (walk, synced) = self.synced_part(x, dy)?;
        let mean = synced.mean;
        let c = self.config.num_features;
        let Some(walk) = walk else {
            return Ok(vec![(0.0, 0.0); c]);
        };
        let plan = self.plan(&walk, x.dtype(), 0)?;
        let sums = self.reduce_and_read(&plan, x, Some(dy), 2)?;
        let slices = plan.whole.slices as usize;
        Ok((0..c)
            .map(|ch| {
                let (s1, s2k) = (0..slices).fold((0.0, 0.0), |(a, b), s| {
                    let v = &sums[(ch * slices + s) * 2..][..2];
                    (a + f64::from(v[0]), b + f64::from(v[1]))
                });
                // centred on K = the mean in f32; sum(dy (x - mean)) = S2 - d S1
                let d = mean[ch] - f64::from(mean[ch] as f32);
                (s1, s2k - d * s1)
            })
            .collect())
    }

    /// `dweight`, `dbias` and the coefficients of `dx` on the host from the
    /// sums of all ranks, the `dx` pass on the device.
    fn apply_grad_sums(
        &mut self,
        x: &GpuTensor,
        dy: &GpuTensor,
        global: &[(f64, f64)],
    ) -> Result<GpuGradients> {
        let (walk, s) = self.synced_part(x, dy)?;
        let c = self.config.num_features;
        validate::channel_len("summed gradients", global.len(), c)?;
        let plan = walk
            .as_ref()
            .map(|w| self.plan(w, x.dtype(), 0))
            .transpose()?;
        let dx = GpuTensor::uninit_as(&self.ctx, x.shape(), x.layout(), x.dtype())?;
        let (weight, _) = self.affine_f64(&self.state()?);
        let (mut dw, mut db, mut coef) = (Vec::new(), Vec::new(), Vec::new());
        for ch in 0..c {
            let (w, b, k) = backward_finalize(
                global[ch],
                s.mean[ch],
                s.invstd[ch],
                weight[ch],
                s.count,
                true,
            );
            dw.push(w as f32);
            db.push(b as f32);
            // dx = a dy + b (x - K) + (c - b d), K the mean in f32
            let center = s.mean[ch] as f32;
            let d = s.mean[ch] - f64::from(center);
            coef.push([center, k.a as f32, k.b as f32, (k.c - k.b * d) as f32]);
        }
        self.views.dweight.write(&dw)?;
        self.views.dbias.write(&db)?;
        self.write_vec4s(&self.coef, &coef);
        if let Some(plan) = plan {
            let ctx = self.ctx.clone();
            let e = elements(&ctx, x.dtype(), self.packed_f16)?;
            self.prepare(&plan.whole)?;
            ctx.run("batchnorm.sync.backward_dx", |enc| {
                let mut passes = Vec::with_capacity(plan.chunks.len());
                for chunk in &plan.chunks {
                    passes.push(self.backward_dx(e, chunk, (x, dy, &dx), false)?);
                }
                self.record(enc, "batchnorm.sync.backward_dx", &passes);
                Ok(())
            })?;
        }
        let affine = self.config.affine;
        Ok(GpuGradients {
            dx,
            dweight: affine.then(|| self.views.dweight.clone()),
            dbias: affine.then(|| self.views.dbias.clone()),
        })
    }
}

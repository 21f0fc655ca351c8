//! The fast CPU backend as a participant of a synchronized BatchNorm
//! ([`crate::sync`]): its own reductions and elementwise passes as the local
//! phases.

use super::CpuBatchNorm;
use super::elementwise::Epilogue;
use super::grad::GradIn;
use super::reduce::{grad_sums, local_moments};
use crate::error::Result;
use crate::layout::DType;
use crate::state::Gradients;
use crate::stats::Moments;
use crate::sync::{SyncPhases, SyncedBackward, global_count, part_walk, synced_backward};
use crate::validate;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::borrow::Cow;

/// The elements of `x` in standard order, rounded to the storage type
/// (their f16 values, for f16 storage, whose arithmetic is `f32` as here);
/// borrowed when they already are.
fn contiguous<'a>(x: &'a ArrayViewD<'_, f32>, storage: DType) -> Cow<'a, [f32]> {
    match x.as_slice() {
        Some(s) if storage == DType::F32 => Cow::Borrowed(s),
        _ => Cow::Owned(x.iter().map(|&v| storage.round(v)).collect()),
    }
}

/// `v` rounded to the storage type, in an array of shape `dims`.
fn output(dims: &[usize], mut v: Vec<f32>, storage: DType) -> ArrayD<f32> {
    if storage != DType::F32 {
        v.iter_mut().for_each(|e| *e = storage.round(*e));
    }
    ArrayD::from_shape_vec(IxDyn(dims), v).expect("shape of x")
}

impl SyncPhases for CpuBatchNorm {
    type Tensor<'a> = ArrayViewD<'a, f32>;
    type Output = ArrayD<f32>;
    type Grads = Gradients;

    fn sync_config(&self) -> &crate::config::BatchNormConfig {
        &self.config
    }

    /// `(count, mean, M2)` per channel by the backend's parallel reduction;
    /// `(0, 0, 0)` for a part with zero samples.
    fn local_moments(&mut self, x: &ArrayViewD<'_, f32>) -> Result<Vec<Moments>> {
        Ok(match part_walk(&self.config, x.shape())? {
            Some(walk) => local_moments(&contiguous(x, self.storage), &walk),
            None => vec![Moments::default(); self.config.num_features],
        })
    }

    fn apply_moments(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        global: &[Moments],
    ) -> Result<ArrayD<f32>> {
        let walk = part_walk(&self.config, x.shape())?;
        let m = global_count(global, self.config.num_features)?;
        let xs = contiguous(x, self.storage);
        let mut y = vec![0.0f32; xs.len()];
        let (dims, epi) = (x.shape(), Epilogue::NONE);
        self.apply_batch_stats(&xs, walk.as_ref(), dims, global, Some(m), epi, &mut y);
        self.sync_count = Some(m);
        Ok(output(x.shape(), y, self.storage))
    }

    fn local_grad_sums(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
    ) -> Result<Vec<(f64, f64)>> {
        let (walk, center, _, _) = self.synced_backward(x, dy)?;
        Ok(match walk {
            Some(w) => {
                let dy = contiguous(dy, self.storage);
                grad_sums(
                    &contiguous(x, self.storage),
                    &GradIn::plain(&dy),
                    &w,
                    &center,
                )
            }
            None => vec![(0.0, 0.0); self.config.num_features],
        })
    }

    fn apply_grad_sums(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
        global: &[(f64, f64)],
    ) -> Result<Gradients> {
        let (walk, center, invstd, m) = self.synced_backward(x, dy)?;
        let c = self.config.num_features;
        validate::channel_len("summed gradients", global.len(), c)?;
        let (xs, dys) = (contiguous(x, self.storage), contiguous(dy, self.storage));
        let (mut dx, mut dw, mut db) = (vec![0.0f32; xs.len()], vec![0.0f32; c], vec![0.0f32; c]);
        let out = (&mut dx[..], &mut dw[..], &mut db[..]);
        let stats = (&center[..], &invstd[..]);
        self.apply_grad_sums_to(&xs, Some(&dys), walk.as_ref(), stats, global, m, true, out);
        let affine = self.config.affine;
        Ok(Gradients {
            dx: output(x.shape(), dx, self.storage),
            dweight: affine.then_some(dw),
            dbias: affine.then_some(db),
        })
    }
}

impl CpuBatchNorm {
    /// [`synced_backward`] of this layer.
    fn synced_backward(
        &self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
    ) -> Result<SyncedBackward> {
        let saved = self.saved.as_ref();
        synced_backward(
            &self.config,
            &self.state,
            saved,
            self.sync_count,
            (x.shape(), dy.shape()),
        )
    }
}

//! The CPU reference as a participant of a synchronized BatchNorm
//! ([`crate::sync`]): the local phases with the reference's own stages.

use super::{CpuReference, backward_partial, stats_partial};
use crate::error::Result;
use crate::fused::Activation;
use crate::stats::Moments;
use crate::sync::{SyncPhases, SyncedBackward, global_count, part_walk, synced_backward};
use crate::validate;
use ndarray::{ArrayD, ArrayViewD, IxDyn};

impl SyncPhases for CpuReference {
    type Tensor<'a> = ArrayViewD<'a, f32>;
    type Output = ArrayD<f32>;
    type Grads = crate::state::Gradients;

    fn sync_config(&self) -> &crate::config::BatchNormConfig {
        &self.config
    }

    /// `(count, mean, M2)` per channel by [`stats_partial`] over the whole
    /// channel of the part; `(0, 0, 0)` for a part with zero samples.
    fn local_moments(&mut self, x: &ArrayViewD<'_, f32>) -> Result<Vec<Moments>> {
        let channels = self.config.num_features;
        Ok(match part_walk(&self.config, x.shape())? {
            Some(walk) => stats_partial(&self.stored(x), &walk, walk.per_channel()),
            None => vec![Moments::default(); channels],
        })
    }

    fn apply_moments(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        global: &[Moments],
    ) -> Result<ArrayD<f32>> {
        let walk = part_walk(&self.config, x.shape())?;
        let m = global_count(global, self.config.num_features)?;
        let xs = self.stored(x);
        let post = (None, Activation::Identity);
        let y = self.apply_batch_stats(&xs, walk.as_ref(), x.shape(), global, Some(m), post);
        self.sync_count = Some(m);
        Ok(ArrayD::from_shape_vec(IxDyn(x.shape()), self.rounded(y)).expect("shape of x"))
    }

    fn local_grad_sums(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
    ) -> Result<Vec<(f64, f64)>> {
        let (walk, center, _, _) = self.synced_backward(x, dy)?;
        Ok(match walk {
            Some(w) => backward_partial(&self.stored(x), &self.stored(dy), &w, &center),
            None => vec![(0.0, 0.0); self.config.num_features],
        })
    }

    fn apply_grad_sums(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
        global: &[(f64, f64)],
    ) -> Result<crate::state::Gradients> {
        let (walk, center, invstd, m) = self.synced_backward(x, dy)?;
        validate::channel_len("summed gradients", global.len(), self.config.num_features)?;
        let (xs, dys) = (self.stored(x), self.stored(dy));
        let stats = (&center[..], &invstd[..]);
        let dims = x.shape();
        let grads = self.apply_grad_sums_to(&xs, &dys, walk.as_ref(), dims, stats, global, m, true);
        Ok(grads)
    }
}

impl CpuReference {
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

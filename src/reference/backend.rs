//! [`CpuReference`] behind the ndarray interface every backend shares: the
//! plain forwards and backward, and the fused ones (`y = act(BN(x) + z)`),
//! which are the same stages with [`normalize_fused`] and [`backward_gate`].

use super::{
    CpuReference, backward_gate, backward_partial, eval_coeffs, normalize_fused, stats_partial,
};
use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::{Error, Result};
use crate::fused::{Activation, FusedGradients, Fusion};
use crate::layout::DType;
use crate::shape::ChannelWalk;
use crate::state::{BatchNormState, Gradients, SavedBatchStats, SavedStats};
use crate::stats::backward_stats;
use crate::sync::SYNCED_FORWARD;
use crate::validate;
use ndarray::{ArrayD, ArrayViewD, IxDyn};

impl CpuReference {
    /// The forward in `mode`, fused with the residual `z` (when given) and
    /// `activation`: every input checked before anything changes, the
    /// output rounded once to the storage type. The plain forwards are the
    /// fusion without `z` and with the identity.
    fn forward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        z: Option<ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        let batch = validate::uses_batch_stats(&self.config, mode);
        let walk = validate::input(&self.config, x.shape(), batch)?;
        if let Some(z) = &z {
            validate::same_shape("z", x.shape(), z.shape())?;
        }
        let xs = &self.stored(&x)[..];
        let zs = z.as_ref().map(|z| self.stored(z));
        let post = (zs.as_deref(), activation);
        let y = if batch {
            // One slice per channel: the two-pass sum over the whole channel.
            let moments = stats_partial(xs, &walk, walk.per_channel());
            let running = (mode == Mode::Train).then(|| walk.per_channel());
            let y = self.apply_batch_stats(xs, Some(&walk), &walk.dims, &moments, running, post);
            self.sync_count = None;
            y
        } else {
            let rm = self.state.running_mean.as_ref().expect("tracked");
            let rv = self.state.running_var.as_ref().expect("tracked");
            let (weight, bias) = self.affine();
            let coef = eval_coeffs(rm, rv, &weight, &bias, self.config.eps);
            normalize_fused(xs, post.0, &walk, &coef, activation)
        };
        let y = self.rounded(y);
        Ok(ArrayD::from_shape_vec(IxDyn(&walk.dims), y).expect("shape of x"))
    }

    /// The backward in `mode` of the BatchNorm at the stored input `xs`
    /// (walked by `walk`) for the upstream gradient `g` (`dy`, or the gated
    /// `dy` of a fused backward).
    ///
    /// # Errors
    /// [`Error::NoSavedStatistics`] when the batch statistics it needs were
    /// not saved for this shape, or came from a synchronized forward.
    fn backward_of(
        &self,
        xs: &[f32],
        g: &[f32],
        walk: &ChannelWalk,
        mode: Mode,
    ) -> Result<Gradients> {
        let batch = validate::uses_batch_stats(&self.config, mode);
        let (center, invstd) = backward_stats(
            &self.config,
            &self.state,
            self.saved.as_ref(),
            &walk.dims,
            batch,
        )?;
        if batch && self.sync_count.is_some() {
            return Err(Error::NoSavedStatistics {
                detail: SYNCED_FORWARD.into(),
            });
        }
        let sums = backward_partial(xs, g, walk, &center);
        let m = walk.per_channel();
        let stats = (&center[..], &invstd[..]);
        Ok(self.apply_grad_sums_to(xs, g, Some(walk), &walk.dims, stats, &sums, m, batch))
    }
}

impl BatchNormBackend for CpuReference {
    fn backend_name(&self) -> String {
        "cpu-reference".into()
    }

    fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.forward(x, None, Activation::Identity, Mode::Train)
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.forward(x, None, Activation::Identity, Mode::Eval)
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        let walk = validate::backward_input(&self.config, x.shape(), dy.shape())?;
        self.backward_of(&self.stored(&x), &self.stored(&dy), &walk, mode)
    }

    /// `y = act(BN(x) + z)` in `f64`, rounded once to the storage type.
    ///
    /// # Errors
    /// Those of the plain forward, checked first, then
    /// [`Error::ShapeMismatch`] naming `z`; nothing changes on error.
    fn forward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        z: Option<ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        self.forward(x, z, activation, mode)
    }

    /// `dz = gate(y, dy)` ([`backward_gate`]), then the plain backward of it.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming `y` or `dy` (checked after `x`, in
    /// that order), then those of the plain backward.
    fn backward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        fusion: Fusion,
        mode: Mode,
    ) -> Result<FusedGradients> {
        let walk = validate::input(&self.config, x.shape(), false)?;
        validate::same_shape("y", x.shape(), y.shape())?;
        validate::same_shape("dy", x.shape(), dy.shape())?;
        let g = backward_gate(&self.stored(&y), &self.stored(&dy), fusion.activation);
        let grads = self.backward_of(&self.stored(&x), &g, &walk, mode)?;
        Ok(FusedGradients {
            dx: grads.dx,
            dz: fusion.residual.then(|| self.output(&walk, g)),
            dweight: grads.dweight,
            dbias: grads.dbias,
        })
    }

    fn saved_stats(&self) -> Result<Option<SavedStats>> {
        Ok(self.saved.as_ref().map(SavedBatchStats::to_f32))
    }

    fn state(&self) -> Result<BatchNormState> {
        Ok(self.state.clone())
    }

    fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        state.validate(&self.config)?;
        self.state = state.clone();
        Ok(())
    }

    fn storage_dtype(&self) -> DType {
        self.storage
    }

    /// The reference emulates f16 storage: inputs and the big outputs are
    /// rounded to f16, the arithmetic stays f64.
    fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        self.storage = dtype;
        Ok(())
    }
}

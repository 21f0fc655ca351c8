//! [`CpuBatchNorm`] behind the ndarray interface every backend shares: the
//! inputs stored as the layer's storage type (`f32`, or rounded to `f16`),
//! the slice methods (plain and fused) run on them, the outputs widened
//! back to `f32`.

use super::CpuBatchNorm;
use super::elem::CpuElement;
use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::Result;
use crate::fused::{Activation, FusedGradients, Fusion};
use crate::layout::DType;
use crate::state::{BatchNormState, Gradients, SavedStats};
use crate::validate;
use half::f16;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::borrow::Cow;

/// The elements of `x` in standard order as `E` (rounded to nearest);
/// borrowed when they already are `f32` in that order.
fn stored<'a, E: CpuElement>(x: &'a ArrayViewD<'_, f32>) -> Cow<'a, [E]> {
    if let Some(s) = x.as_slice().and_then(E::from_f32_slice) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(x.iter().map(|&v| E::store(v)).collect())
}

/// `v` widened to `f32`, in an array of shape `dims`.
fn widened<E: CpuElement>(dims: &[usize], v: Vec<E>) -> ArrayD<f32> {
    let v = E::into_f32_vec(v).unwrap_or_else(|v| v.iter().map(|e| e.load()).collect());
    ArrayD::from_shape_vec(IxDyn(dims), v).expect("shape of x")
}

impl CpuBatchNorm {
    /// A fused forward in `mode` of the ndarray `x` (and `z`), stored as `E`;
    /// the plain forwards are the fusion without `z` and with the identity.
    fn forward_as<E: CpuElement>(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        z: Option<&ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        // Shape checks first, so that a wrong z is named as such.
        validate::input(
            &self.config,
            x.shape(),
            validate::uses_batch_stats(&self.config, mode),
        )?;
        if let Some(z) = z {
            validate::same_shape("z", x.shape(), z.shape())?;
        }
        let xs = stored::<E>(x);
        let zs = z.map(stored::<E>);
        let mut y = vec![E::store(0.0); xs.len()];
        self.forward_fused_slice(&xs, zs.as_deref(), x.shape(), activation, mode, &mut y)?;
        Ok(widened(x.shape(), y))
    }

    /// A fused forward in `mode` of the ndarray `x` (and `z`), in the storage type.
    fn forward_array(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        z: Option<&ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        match self.storage {
            DType::F32 => self.forward_as::<f32>(x, z, activation, mode),
            DType::F16 => self.forward_as::<f16>(x, z, activation, mode),
        }
    }

    /// Backward of the ndarray `x`, `dy` (gated by `y` for `Some((y,
    /// fusion))`), stored as `E`.
    fn backward_as<E: CpuElement>(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
        mode: Mode,
        fused: Option<(&ArrayViewD<'_, f32>, Fusion)>,
    ) -> Result<FusedGradients> {
        let (xs, dys) = (stored::<E>(x), stored::<E>(dy));
        let c = self.config.num_features;
        let mut dx = vec![E::store(0.0); xs.len()];
        let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
        let mut dz = match fused {
            Some((_, f)) if f.residual => Some(vec![E::store(0.0); xs.len()]),
            _ => None,
        };
        let out = (&mut dx[..], dz.as_deref_mut(), &mut dw[..], &mut db[..]);
        match fused {
            Some((y, f)) => {
                let ys = stored::<E>(y);
                let gate = Some((&ys[..], f.activation));
                self.backward_with(&xs, &dys, x.shape(), mode, gate, out)?;
            }
            None => self.backward_with(&xs, &dys, x.shape(), mode, None, out)?,
        }
        let affine = self.config.affine;
        Ok(FusedGradients {
            dx: widened(x.shape(), dx),
            dz: dz.map(|dz| widened(x.shape(), dz)),
            dweight: affine.then_some(dw),
            dbias: affine.then_some(db),
        })
    }

    /// Backward of the ndarray tensors in the storage type, the shapes
    /// checked first (`x`, then `y` when fused, then `dy`) so that a wrong
    /// tensor is named as such.
    fn backward_array(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
        mode: Mode,
        fused: Option<(&ArrayViewD<'_, f32>, Fusion)>,
    ) -> Result<FusedGradients> {
        validate::input(&self.config, x.shape(), false)?;
        if let Some((y, _)) = fused {
            validate::same_shape("y", x.shape(), y.shape())?;
        }
        validate::same_shape("dy", x.shape(), dy.shape())?;
        match self.storage {
            DType::F32 => self.backward_as::<f32>(x, dy, mode, fused),
            DType::F16 => self.backward_as::<f16>(x, dy, mode, fused),
        }
    }
}

impl BatchNormBackend for CpuBatchNorm {
    fn backend_name(&self) -> String {
        "cpu".into()
    }

    fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.forward_array(&x, None, Activation::Identity, Mode::Train)
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.forward_array(&x, None, Activation::Identity, Mode::Eval)
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        self.backward_array(&x, &dy, mode, None)
            .map(Gradients::from)
    }

    /// [`CpuBatchNorm::forward_fused_slice`] on the inputs in the storage type.
    fn forward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        z: Option<ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        self.forward_array(&x, z.as_ref(), activation, mode)
    }

    /// [`CpuBatchNorm::backward_fused_slice`] on the inputs in the storage type.
    fn backward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        fusion: Fusion,
        mode: Mode,
    ) -> Result<FusedGradients> {
        self.backward_array(&x, &dy, mode, Some((&y, fusion)))
    }

    fn saved_stats(&self) -> Result<Option<SavedStats>> {
        Ok(CpuBatchNorm::saved_stats(self))
    }

    fn state(&self) -> Result<BatchNormState> {
        Ok(self.state.clone())
    }

    fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        CpuBatchNorm::set_state(self, state)
    }

    fn storage_dtype(&self) -> DType {
        self.storage
    }

    /// f32 and f16 storage (see [`CpuBatchNorm::set_storage_dtype`]).
    fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        CpuBatchNorm::set_storage_dtype(self, dtype)
    }
}

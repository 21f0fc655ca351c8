//! [`CpuBatchNorm`] behind the ndarray interface every backend shares: the
//! inputs stored as the layer's storage type (`f32`, or rounded to `f16`),
//! the slice methods run on them, the outputs widened back to `f32`.

use super::CpuBatchNorm;
use super::elem::CpuElement;
use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::Result;
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
    /// A forward in `mode` of the ndarray `x`, stored as `E`.
    fn forward_as<E: CpuElement>(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        let xs = stored::<E>(x);
        let mut y = vec![E::store(0.0); xs.len()];
        match mode {
            Mode::Train => self.forward_train_slice(&xs, x.shape(), &mut y)?,
            Mode::Eval => self.forward_eval_slice(&xs, x.shape(), &mut y)?,
        }
        Ok(widened(x.shape(), y))
    }

    /// A forward in `mode` of the ndarray `x`, in the storage type.
    fn forward_array(&mut self, x: &ArrayViewD<'_, f32>, mode: Mode) -> Result<ArrayD<f32>> {
        match self.storage {
            DType::F32 => self.forward_as::<f32>(x, mode),
            DType::F16 => self.forward_as::<f16>(x, mode),
        }
    }

    /// Backward of the ndarray `x`, `dy`, stored as `E`.
    fn backward_as<E: CpuElement>(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        dy: &ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        let (xs, dys) = (stored::<E>(x), stored::<E>(dy));
        let c = self.config.num_features;
        let mut dx = vec![E::store(0.0); xs.len()];
        let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
        self.backward_slice(&xs, &dys, x.shape(), mode, &mut dx, &mut dw, &mut db)?;
        let affine = self.config.affine;
        Ok(Gradients {
            dx: widened(x.shape(), dx),
            dweight: affine.then_some(dw),
            dbias: affine.then_some(db),
        })
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
        self.forward_array(&x, Mode::Train)
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        self.forward_array(&x, Mode::Eval)
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        // Shape checks first so that a wrong dy is named as such.
        validate::backward_input(&self.config, x.shape(), dy.shape())?;
        match self.storage {
            DType::F32 => self.backward_as::<f32>(&x, &dy, mode),
            DType::F16 => self.backward_as::<f16>(&x, &dy, mode),
        }
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

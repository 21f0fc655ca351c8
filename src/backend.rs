//! One interface over every implementation, so one test body runs on all of them.

use crate::config::{BatchNormConfig, Mode};
use crate::error::{Error, Result};
use crate::fused::{Activation, FusedGradients, Fusion};
use crate::layout::DType;
use crate::state::{BatchNormState, Gradients, SavedStats};
use ndarray::{ArrayD, ArrayViewD};

/// A BatchNorm layer on some backend (the CPU reference, a wgpu adapter, ...),
/// with ndarray tensors at the edge. Tensors are in the layer's
/// [`BatchNormConfig::layout`].
///
/// Every method leaves the layer unchanged when it returns `Err`.
pub trait BatchNormBackend {
    /// A short name of the backend, e.g. `cpu-reference` or `vulkan:llvmpipe`.
    fn backend_name(&self) -> String;

    /// The layer's configuration.
    fn config(&self) -> &BatchNormConfig;

    /// Training forward: normalizes with batch statistics, keeps them for backward,
    /// and updates the running statistics (when tracked).
    ///
    /// # Errors
    /// Shape, channel and one-value-per-channel errors; device errors on GPUs.
    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>>;

    /// Evaluation forward: normalizes with the running statistics, or with batch
    /// statistics (kept for backward) when they are not tracked.
    ///
    /// # Errors
    /// Shape and channel errors; device errors on GPUs.
    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>>;

    /// Backward of the forward in `mode` at input `x` with upstream gradient `dy`.
    ///
    /// `Mode::Train` (and `Mode::Eval` without tracked statistics) uses the batch
    /// statistics kept by the last forward on an input of this shape.
    ///
    /// # Errors
    /// Shape mismatches, missing saved statistics; device errors on GPUs.
    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients>;

    /// Fused forward `y = act(BN(x) + z)` in `mode`: the BatchNorm exactly as
    /// [`BatchNormBackend::forward_train`] (`Mode::Train`: batch statistics
    /// kept, running statistics updated) or [`BatchNormBackend::forward_eval`]
    /// (`Mode::Eval`) does it, then the residual `z` (same shape as `x`) added
    /// when given, then `activation`, in one pass over the output.
    ///
    /// # Errors
    /// Those of the plain forward, and a `z` whose shape is not `x`'s; the
    /// default implementation returns [`Error::Unsupported`].
    fn forward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        z: Option<ArrayViewD<'_, f32>>,
        activation: Activation,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        let _ = (x, z, activation, mode);
        Err(Error::Unsupported {
            adapter: self.backend_name(),
            what: "fused BatchNorm".into(),
        })
    }

    /// Backward of [`BatchNormBackend::forward_fused`] in `mode` at input `x`,
    /// with its output `y` (the ReLU's mask: the gradient stops where
    /// `y <= 0`) and upstream gradient `dy`: `dz` (the gated `dy`, when
    /// `fusion.residual`), then the BatchNorm's backward of the gated `dy`
    /// exactly as [`BatchNormBackend::backward`] does it.
    ///
    /// # Errors
    /// Those of the plain backward, and a `y` whose shape is not `x`'s; the
    /// default implementation returns [`Error::Unsupported`].
    fn backward_fused(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        fusion: Fusion,
        mode: Mode,
    ) -> Result<FusedGradients> {
        let _ = (x, y, dy, fusion, mode);
        Err(Error::Unsupported {
            adapter: self.backend_name(),
            what: "fused BatchNorm".into(),
        })
    }

    /// Batch statistics kept by the last forward that computed them.
    ///
    /// # Errors
    /// Device errors on GPUs.
    fn saved_stats(&self) -> Result<Option<SavedStats>>;

    /// Parameters and running statistics.
    ///
    /// # Errors
    /// Device errors on GPUs.
    fn state(&self) -> Result<BatchNormState>;

    /// Replaces parameters and running statistics.
    ///
    /// # Errors
    /// [`crate::Error::ParameterLength`], [`crate::Error::MissingParameter`]; device errors.
    fn set_state(&mut self, state: &BatchNormState) -> Result<()>;

    /// Storage type the backend computes on: ndarray inputs are rounded to it,
    /// outputs are rounded to it and come back widened to f32. Default f32.
    fn storage_dtype(&self) -> DType {
        DType::F32
    }

    /// Sets the storage type (see [`BatchNormBackend::storage_dtype`]).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the backend cannot store `dtype`; the default
    /// implementation takes only f32.
    fn set_storage_dtype(&mut self, dtype: DType) -> Result<()> {
        match dtype {
            DType::F32 => Ok(()),
            other => Err(Error::Unsupported {
                adapter: self.backend_name(),
                what: format!("{other} storage"),
            }),
        }
    }
}

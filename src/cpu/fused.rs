//! The fused BatchNorm of the fast CPU backend, `y = act(BN(x) + z)`, on
//! slices: the residual and the activation ride on the normalize pass, and
//! the backward gates `dy` by `y` in the reductions' pass (see
//! [`crate::FusedOp::ideal_bytes_per_element`] for the traffic each counts).

use super::CpuBatchNorm;
use super::elem::CpuElement;
use super::elementwise::Epilogue;
use crate::config::Mode;
use crate::error::Result;
use crate::fused::Activation;

impl CpuBatchNorm {
    /// Fused forward in `mode` on a contiguous tensor of shape `dims` into
    /// `y`: the BatchNorm exactly as [`CpuBatchNorm::forward_train_slice`]
    /// (`Mode::Train`) or [`CpuBatchNorm::forward_eval_slice`] (`Mode::Eval`)
    /// computes it, then the residual `z` (same length) added when given,
    /// then `activation`, in `f32` and in the same pass, rounded once when
    /// stored.
    ///
    /// ```text
    /// y = act((x - mean) / sqrt(var + eps) * weight + bias + z)     act: identity or ReLU
    /// ```
    ///
    /// ```
    /// use wgpu_batchnorm::{Activation, BatchNormConfig, CpuBatchNorm, Mode};
    /// let mut bn = CpuBatchNorm::new(BatchNormConfig::new(1))?;
    /// let (x, z) = ([1.0f32, 3.0], [0.5f32, 0.5]);
    /// let mut y = [0.0f32; 2];
    /// bn.forward_fused_slice(&x, Some(&z), &[2, 1], Activation::Relu, Mode::Train, &mut y)?;
    /// // BN gives -1, 1 (up to eps); plus 0.5, then the ReLU.
    /// assert!(y[0] == 0.0 && (y[1] - 1.5).abs() < 1e-4);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// As the plain forward of `mode`, and [`crate::Error::ShapeMismatch`]
    /// naming `z` when it does not hold `dims`' elements. On error the layer
    /// is unchanged and `y` unwritten.
    pub fn forward_fused_slice<E: CpuElement>(
        &mut self,
        x: &[E],
        z: Option<&[E]>,
        dims: &[usize],
        activation: Activation,
        mode: Mode,
        y: &mut [E],
    ) -> Result<()> {
        self.forward_with(x, dims, mode, Epilogue { z, activation }, y)
    }

    /// Backward of [`CpuBatchNorm::forward_fused_slice`] in `mode` at input
    /// `x`, with its output `y` and the upstream gradient `dy`: the gated
    /// gradient `g` ([`Activation::gate`]: zero where `y <= 0` for the ReLU)
    /// into `dz` when given (the residual's gradient), then the plain
    /// backward of `g` into `dx`, `dweight` and `dbias` exactly as
    /// [`CpuBatchNorm::backward_slice`] computes it.
    ///
    /// Two passes over the tensor: the reductions read `x`, `dy` and `y` and
    /// write `g` (into `dz`, or into `dx` as scratch), the `dx` pass reads
    /// `x` and `g` and writes `dx`. With the identity and no `dz` it is the
    /// plain backward (`y` is only checked).
    ///
    /// ```
    /// use wgpu_batchnorm::{Activation, BatchNormConfig, CpuBatchNorm, Mode};
    /// let mut bn = CpuBatchNorm::new(BatchNormConfig::new(1))?;
    /// let (x, dims) = ([1.0f32, 2.0, 6.0], [3, 1]);
    /// let mut y = [0.0f32; 3];
    /// bn.forward_fused_slice(&x, None, &dims, Activation::Relu, Mode::Train, &mut y)?;
    /// let dy = [1.0f32, 1.0, 1.0];
    /// let (mut dx, mut dz, mut dw, mut db) = ([0.0f32; 3], [9.0f32; 3], [0.0], [0.0]);
    /// bn.backward_fused_slice(
    ///     &x, &y, &dy, &dims, Activation::Relu, Mode::Train,
    ///     &mut dx, Some(&mut dz), &mut dw, &mut db,
    /// )?;
    /// assert_eq!(dz, [0.0, 0.0, 1.0]); // y = 0 stops the gradient of the first two
    /// assert_eq!(db, [1.0]);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`CpuBatchNorm::backward_slice`], and [`crate::Error::ShapeMismatch`]
    /// naming `y` or `dz` when it does not hold `dims`' elements. On error
    /// nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_fused_slice<E: CpuElement>(
        &mut self,
        x: &[E],
        y: &[E],
        dy: &[E],
        dims: &[usize],
        activation: Activation,
        mode: Mode,
        dx: &mut [E],
        dz: Option<&mut [E]>,
        dweight: &mut [f32],
        dbias: &mut [f32],
    ) -> Result<()> {
        let gate = Some((y, activation));
        self.backward_with(x, dy, dims, mode, gate, (dx, dz, dweight, dbias))
    }
}

//! BatchNorm fused with what follows it in a ResNet block: `y = act(BN(x) + z)`.
//!
//! Almost every BatchNorm of a ResNet is followed by a ReLU, often after the
//! residual branch `z` is added. Run as separate passes, the add and the ReLU
//! each read and write the whole activation again; fused, they ride on the
//! normalization pass. The backward takes the fused forward's output `y` (its
//! sign is the ReLU mask) and returns `dz`, the residual's gradient, with the
//! BatchNorm's own `dx`, `dweight` and `dbias`.
//!
//! ```
//! use wgpu_batchnorm::{Activation, FusedOp, Fusion, Operation, DType};
//! let f = Fusion::new(true, Activation::Relu);
//! assert_eq!(f.name(), "add_relu");
//! // Training forward with a residual: read x twice, read z, write y (f32).
//! let op = FusedOp::new(Operation::TrainForward, f);
//! assert_eq!(op.ideal_bytes_per_element(DType::F32), 16.0);
//! assert_eq!(op.name(), "fused_train_forward");
//! ```

use crate::layout::DType;
use crate::operation::Operation;
use crate::state::Gradients;

/// The activation after the (optional) residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// `act(v) = v`.
    #[default]
    Identity,
    /// `act(v) = max(v, 0)`, NaN staying NaN; its gradient is stopped where
    /// the output is `<= 0` (PyTorch's `threshold_backward` on the output:
    /// a NaN output lets the gradient through).
    Relu,
}

impl Activation {
    /// `identity` or `relu` (the fixture format's `activation` key).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Relu => "relu",
        }
    }

    /// Parses [`Activation::name`], case-insensitively.
    pub fn parse(s: &str) -> Option<Activation> {
        match s.to_ascii_lowercase().as_str() {
            "identity" | "none" => Some(Activation::Identity),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    /// The activation of one value, in any float type: NaN stays NaN (a
    /// comparison selects, `max` is not relied on).
    pub fn apply<T: PartialOrd + Default + Copy>(self, v: T) -> T {
        match self {
            Activation::Identity => v,
            // `v < 0` is false for NaN, which passes unchanged.
            Activation::Relu if v < T::default() => T::default(),
            Activation::Relu => v,
        }
    }

    /// The upstream gradient `dy` let through at fused output `y`: all of it
    /// for the identity; for the ReLU zero where `y <= 0` and `dy` elsewhere,
    /// a NaN `y` included (PyTorch's `threshold_backward`).
    pub fn gate<T: PartialOrd + Default + Copy>(self, y: T, dy: T) -> T {
        match self {
            Activation::Identity => dy,
            Activation::Relu if y <= T::default() => T::default(),
            Activation::Relu => dy,
        }
    }
}

/// What a fused call does after the BatchNorm: add the residual `z` or not,
/// then the activation. `Fusion::default()` is the plain BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Fusion {
    /// Add a residual tensor `z` (same shape and layout as `x`) before the activation.
    pub residual: bool,
    /// The activation after the add.
    pub activation: Activation,
}

impl Fusion {
    /// A fusion with or without the residual add, then `activation`.
    pub fn new(residual: bool, activation: Activation) -> Self {
        Self {
            residual,
            activation,
        }
    }

    /// Every fusion: `none`, `relu`, `add`, `add_relu`.
    pub const ALL: [Fusion; 4] = [
        Fusion {
            residual: false,
            activation: Activation::Identity,
        },
        Fusion {
            residual: false,
            activation: Activation::Relu,
        },
        Fusion {
            residual: true,
            activation: Activation::Identity,
        },
        Fusion {
            residual: true,
            activation: Activation::Relu,
        },
    ];

    /// `none`, `relu`, `add` or `add_relu`.
    pub fn name(self) -> &'static str {
        match (self.residual, self.activation) {
            (false, Activation::Identity) => "none",
            (false, Activation::Relu) => "relu",
            (true, Activation::Identity) => "add",
            (true, Activation::Relu) => "add_relu",
        }
    }

    /// Parses [`Fusion::name`], case-insensitively.
    pub fn parse(s: &str) -> Option<Fusion> {
        Fusion::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
    }

    /// The fused output of one value: `act(bn + z)`, `z = 0` without the residual.
    pub fn apply<T: PartialOrd + Default + Copy + std::ops::Add<Output = T>>(
        self,
        bn: T,
        z: T,
    ) -> T {
        let v = if self.residual { bn + z } else { bn };
        self.activation.apply(v)
    }
}

/// A fused operation, as `bnorm bench --op fused` names and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FusedOp {
    /// The BatchNorm operation underneath.
    pub op: Operation,
    /// What follows it.
    pub fusion: Fusion,
}

impl FusedOp {
    /// `op` fused with `fusion`.
    pub fn new(op: Operation, fusion: Fusion) -> Self {
        Self { op, fusion }
    }

    /// The record name: `fused_` and the operation's name
    /// (`fused_train_forward`, `fused_eval_forward`, `fused_backward`); the
    /// fusion goes in its own record field.
    pub fn name(self) -> &'static str {
        match self.op {
            Operation::TrainForward => "fused_train_forward",
            Operation::EvalForward => "fused_eval_forward",
            Operation::Backward => "fused_backward",
        }
    }

    /// The traffic floor per element of `x` in bytes that the fused op is
    /// measured against (f32; half for f16 storage). Forward: the plain
    /// BatchNorm's (training 12, evaluation 8) plus 4 to read `z`. Backward
    /// of a ReLU: 28, one pass reading `x`, `dy` and `y` (the mask) for the
    /// sums and writing the gated `dy` (as `dz`, or as scratch in `dx`), one
    /// reading `x` and that and writing `dx`; of the identity: the plain 20,
    /// plus 4 to write `dz` with a residual.
    ///
    /// ```
    /// use wgpu_batchnorm::{Activation, DType, FusedOp, Fusion, Operation};
    /// let bytes = |op, r, a| FusedOp::new(op, Fusion::new(r, a)).ideal_bytes_per_element(DType::F32);
    /// assert_eq!(bytes(Operation::EvalForward, true, Activation::Relu), 12.0);
    /// assert_eq!(bytes(Operation::Backward, true, Activation::Relu), 28.0);
    /// assert_eq!(bytes(Operation::Backward, false, Activation::Relu), 28.0);
    /// assert_eq!(bytes(Operation::Backward, true, Activation::Identity), 24.0);
    /// assert_eq!(bytes(Operation::Backward, false, Activation::Identity), 20.0);
    /// ```
    pub fn ideal_bytes_per_element(self, dtype: DType) -> f64 {
        let plain = self.op.ideal_bytes_per_element(DType::F32);
        let f32_bytes = match self.op {
            Operation::TrainForward | Operation::EvalForward if self.fusion.residual => plain + 4.0,
            Operation::TrainForward | Operation::EvalForward => plain,
            Operation::Backward => match self.fusion.activation {
                Activation::Relu => 28.0,
                Activation::Identity if self.fusion.residual => plain + 4.0,
                Activation::Identity => plain,
            },
        };
        f32_bytes * dtype.size() as f64 / 4.0
    }
}

/// Result of a fused backward: the BatchNorm's gradients, and the residual's.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedGradients {
    /// Gradient with respect to `x`, same shape and layout.
    pub dx: ndarray::ArrayD<f32>,
    /// Gradient with respect to the residual `z` (the gated `dy`), when the
    /// fusion has one.
    pub dz: Option<ndarray::ArrayD<f32>>,
    /// Gradient with respect to `weight` (affine only).
    pub dweight: Option<Vec<f32>>,
    /// Gradient with respect to `bias` (affine only).
    pub dbias: Option<Vec<f32>>,
}

impl From<FusedGradients> for Gradients {
    /// The BatchNorm's own gradients, without the residual's.
    fn from(g: FusedGradients) -> Self {
        Gradients {
            dx: g.dx,
            dweight: g.dweight,
            dbias: g.dbias,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_keeps_nan_and_gates_on_the_output() {
        assert!(Activation::Relu.apply(f32::NAN).is_nan());
        assert_eq!(Activation::Relu.apply(-0.5f32), 0.0);
        assert_eq!(Activation::Relu.apply(f32::INFINITY), f32::INFINITY);
        assert_eq!(Activation::Relu.gate(0.0f64, 3.0), 0.0);
        assert_eq!(Activation::Relu.gate(f64::NAN, 3.0), 3.0);
        assert_eq!(Activation::Relu.gate(-0.0f32, 3.0), 0.0);
        assert_eq!(Activation::Relu.gate(1e-30f64, 3.0), 3.0);
        assert_eq!(Activation::Identity.gate(-1.0f32, 3.0), 3.0);
    }

    #[test]
    fn names_round_trip() {
        for f in Fusion::ALL {
            assert_eq!(Fusion::parse(f.name()), Some(f));
        }
        assert_eq!(
            Fusion::parse("ADD_RELU"),
            Some(Fusion::new(true, Activation::Relu))
        );
        assert_eq!(Fusion::parse("relu6"), None);
        assert_eq!(Activation::parse("ReLU"), Some(Activation::Relu));
        assert_eq!(Fusion::default().name(), "none");
    }

    #[test]
    fn fused_apply_adds_then_activates() {
        let f = Fusion::new(true, Activation::Relu);
        assert_eq!(f.apply(-1.0f64, 0.25), 0.0);
        assert_eq!(f.apply(1.0f64, -0.25), 0.75);
        assert_eq!(
            Fusion::new(false, Activation::Relu).apply(1.0f32, -5.0),
            1.0
        );
    }
}

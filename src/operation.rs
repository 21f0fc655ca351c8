//! The three operations of a BatchNorm layer, as benchmarks name and count them.

use crate::layout::DType;

/// One operation of a BatchNorm layer, with its name in benchmark records and
/// its ideal memory traffic.
///
/// ```
/// use wgpu_batchnorm::{DType, Operation};
/// assert_eq!(Operation::Backward.name(), "backward");
/// assert_eq!(Operation::TrainForward.ideal_bytes_per_element(DType::F32), 12.0);
/// assert_eq!(Operation::EvalForward.ideal_bytes_per_element(DType::F16), 4.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Training forward: batch statistics, `y`, the running-statistics update.
    TrainForward,
    /// Evaluation forward with the running statistics.
    EvalForward,
    /// Backward of a training forward: `dx`, `dweight`, `dbias`.
    Backward,
}

impl Operation {
    /// Every operation: training forward, evaluation forward, backward.
    pub const ALL: [Operation; 3] = [
        Operation::TrainForward,
        Operation::EvalForward,
        Operation::Backward,
    ];

    /// The record name: `train_forward`, `eval_forward`, `backward`
    /// (as `bnorm bench` and `scripts/torch_bench.py` name them).
    pub fn name(self) -> &'static str {
        match self {
            Operation::TrainForward => "train_forward",
            Operation::EvalForward => "eval_forward",
            Operation::Backward => "backward",
        }
    }

    /// Ideal traffic per element of `x` in bytes: f32 training forward 12
    /// (read `x` twice, write `y`), evaluation forward 8, backward 20 (read
    /// `x` and `dy` twice, write `dx`); half of that for f16 storage.
    /// Per-channel tensors are not counted.
    pub fn ideal_bytes_per_element(self, dtype: DType) -> f64 {
        let f32_bytes = match self {
            Operation::TrainForward => 12.0,
            Operation::EvalForward => 8.0,
            Operation::Backward => 20.0,
        };
        f32_bytes * dtype.size() as f64 / 4.0
    }
}

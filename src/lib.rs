//! # wgpu-batchnorm
//!
//! Batch Normalization on any GPU that [wgpu] reaches (Vulkan, Metal, DX12, GL),
//! with PyTorch's semantics, and a CPU reference in `f64` that proves it right.
//!
//! - [`GpuBatchNorm`]: training forward (batch statistics, running-statistics
//!   update), evaluation forward and backward (`dx`, `dweight`, `dbias`) on
//!   device-resident [`GpuTensor`]s, recorded into the app's own
//!   `wgpu::CommandEncoder` (`record_*`) or run and waited for (`run_*`).
//!   [`GpuContext::from_device`] puts it on a device the app already owns,
//!   and [`GpuTensor::from_buffer`] on the app's buffers.
//! - [`CpuReference`]: the same operations on the CPU, accumulating in `f64`.
//! - [`BatchNormBackend`]: the ndarray interface both implement, so one test
//!   body runs on every backend.
//! - [`sync`]: synchronized BatchNorm for data-parallel training, the ranks'
//!   statistics merged exactly through any [`sync::Collective`] (in one
//!   process, or over MPI).
//! - [`Fusion`]: BatchNorm fused with the residual add and ReLU that follow
//!   it in a ResNet block, `y = act(BN(x) + z)`, forward and backward, in one
//!   pass over the output.
//! - [`fold`]: a BatchNorm folded into the convolution or linear layer before
//!   it, for inference (and, with `safetensors`, every BatchNorm of a
//!   PyTorch `state_dict`).
//!
//! Semantics are PyTorch's `torch.nn.BatchNorm1d/2d/3d`: the biased variance
//! normalizes, the unbiased one enters the running variance, `momentum = None`
//! is the cumulative average over `num_batches_tracked`, and training on one
//! value per channel is an error.
//!
//! ## Quickstart
//!
//! ```no_run
//! use ndarray::{Array, IxDyn};
//! use wgpu_batchnorm::{BatchNormConfig, GpuBatchNorm, GpuContext, GpuTensor};
//!
//! // The best adapter; WGPU_BACKEND=vulkan|gl|metal|dx12 and WGPU_ADAPTER_NAME narrow the choice.
//! let ctx = GpuContext::new()?;
//! let mut bn = GpuBatchNorm::new(&ctx, BatchNormConfig::new(16))?; // eps 1e-5, momentum 0.1
//!
//! let x = Array::from_shape_fn(IxDyn(&[8, 16, 32, 32]), |i| ((i[0] + 3 * i[1] + i[2] * i[3]) % 17) as f32);
//! let x = GpuTensor::from_array(&ctx, x.view(), bn.config().layout)?;
//!
//! let fwd = bn.run_forward_train(&x)?;                  // batch statistics; running stats updated
//! let grads = bn.run_backward(&x, &fwd.y, &fwd.saved)?; // dx, dweight, dbias (here with dy = y)
//! let y_eval = bn.run_forward_eval(&x)?.y;              // running statistics
//!
//! println!("{:?}", bn.state()?.running_mean);
//! println!("{:?}", grads.dweight.unwrap().to_vec()?);
//! println!("{}", y_eval.to_array()?.mean().unwrap());
//! # Ok::<(), wgpu_batchnorm::Error>(())
//! ```
//!
//! No GPU? Mesa's software Vulkan device (lavapipe, `apt-get install
//! mesa-vulkan-drivers` on Debian and Ubuntu) runs all of it on the CPU.
//!
//! ## Features
//!
//! - `safetensors` (off by default): PyTorch checkpoints (`checkpoint`,
//!   `StateDict`) and the parity-fixture format and runner (`fixture`), both
//!   safetensors files. Without it the crate compiles only what BatchNorm
//!   itself needs.
//! - `mpi` (off by default): `sync::MpiCollective`, synchronized BatchNorm
//!   across MPI ranks (rsmpi; needs an MPI library and libclang to build).

#![warn(missing_docs)]

mod backend;
#[cfg(feature = "safetensors")]
pub mod checkpoint;
mod config;
pub mod cpu;
mod error;
#[cfg(feature = "safetensors")]
pub mod fixture;
pub mod fold;
mod fused;
pub mod gpu;
mod layout;
mod operation;
pub mod reference;
pub mod shaders;
mod shape;
mod state;
mod stats;
pub mod sync;
mod validate;

pub use backend::BatchNormBackend;
#[cfg(feature = "safetensors")]
pub use checkpoint::StateDict;
pub use config::{BatchNormConfig, Mode};
pub use cpu::CpuBatchNorm;
pub use error::{Error, Result};
#[cfg(feature = "safetensors")]
pub use fixture::{Fixture, FixtureReport, run_fixture};
pub use fused::{Activation, FusedGradients, FusedOp, Fusion};
pub use gpu::GpuFusedGradients;
pub use gpu::{
    AdapterSelection, GpuBatchNorm, GpuContext, GpuDispatch, GpuForward, GpuGradients,
    GpuResourceCounts, GpuSavedStats, GpuTensor,
};
pub use layout::{DType, Layout};
pub use operation::Operation;
pub use reference::CpuReference;
pub use shape::ChannelWalk;
pub use state::{BatchNormState, Gradients, SavedStats};
pub use stats::Moments;
pub use wgpu;

/// The README's examples, compiled and run as doctests (some load checkpoints).
#[cfg(all(doctest, feature = "safetensors"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

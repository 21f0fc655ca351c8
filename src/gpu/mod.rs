//! The wgpu backend: device choice, device-resident tensors, the BatchNorm passes.

mod batchnorm;
mod context;
mod copy;
pub(crate) mod kernels;
mod tensor;
mod timing;

pub use batchnorm::{GpuBatchNorm, GpuGradients};
pub use context::{AdapterSelection, GpuContext, enumerate_adapters, parse_backend};
pub use tensor::GpuTensor;

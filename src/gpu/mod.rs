//! The wgpu backend: adapter choice, the device and its pipelines,
//! device-resident tensors, the BatchNorm passes.
//!
//! Modules, each using only those listed before it: `adapter` (which
//! adapters), `device` (a device and queue: error scopes, waits, readback),
//! `kernels` (a pipeline and its bind group layout, the uniform block),
//! `pipelines` (every pipeline of a device, per storage type), `timing` (timestamp
//! queries), `context` (the [`GpuContext`]), `submit` (its blocking path and
//! readback), `tensor` ([`GpuTensor`]), `copy`
//! (the copy roofline), `batchnorm` ([`GpuBatchNorm`]).

mod adapter;
mod batchnorm;
mod context;
mod copy;
mod device;
pub(crate) mod kernels;
mod pipelines;
mod submit;
mod tensor;
mod timing;

pub use adapter::{AdapterSelection, enumerate_adapters, parse_backend};
pub use batchnorm::{
    GpuBatchNorm, GpuDispatch, GpuForward, GpuFusedGradients, GpuGradients, GpuResourceCounts,
    GpuSavedStats,
};
pub use context::GpuContext;
pub use tensor::GpuTensor;

//! Device-resident tensors.

use super::context::GpuContext;
use crate::config::Layout;
use crate::error::{Error, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// A contiguous f32 tensor that lives in a GPU buffer, with its shape and layout.
///
/// Outputs of one BatchNorm call can be fed to the next without a round trip
/// through the host.
///
/// ```no_run
/// use ndarray::ArrayD;
/// use wgpu_batchnorm::{GpuContext, GpuTensor, Layout};
/// let ctx = GpuContext::new()?;
/// let x = ArrayD::<f32>::ones(vec![2, 3, 4]);
/// let t = GpuTensor::from_array(&ctx, x.view(), Layout::ChannelsFirst)?;
/// assert_eq!(t.to_array()?, x);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GpuTensor {
    pub(crate) buffer: wgpu::Buffer,
    dims: Vec<usize>,
    layout: Layout,
    ctx: GpuContext,
}

impl GpuTensor {
    /// Uploads `x` (any memory order; it is stored in standard order).
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits.
    pub fn from_array(ctx: &GpuContext, x: ArrayViewD<'_, f32>, layout: Layout) -> Result<Self> {
        let std = x.as_standard_layout();
        Self::from_slice(
            ctx,
            std.as_slice().expect("standard layout"),
            x.shape(),
            layout,
        )
    }

    /// Uploads `data` in standard (row-major) order with shape `dims`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `data.len()` is not the product of `dims`;
    /// [`Error::TooLarge`] past the device's buffer limits.
    pub fn from_slice(
        ctx: &GpuContext,
        data: &[f32],
        dims: &[usize],
        layout: Layout,
    ) -> Result<Self> {
        let len: usize = dims.iter().product();
        if len != data.len() {
            return Err(Error::ShapeMismatch {
                what: "tensor data".into(),
                expected: dims.to_vec(),
                got: vec![data.len()],
            });
        }
        let bytes = (len * 4) as u64;
        ctx.check_storage_size(&format!("tensor of shape {dims:?}"), bytes)?;
        Ok(Self {
            buffer: ctx.storage_buffer_init("batchnorm.tensor", bytemuck::cast_slice(data)),
            dims: dims.to_vec(),
            layout,
            ctx: ctx.clone(),
        })
    }

    /// A tensor of shape `dims` whose contents are unspecified until written.
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits.
    pub fn uninit(ctx: &GpuContext, dims: &[usize], layout: Layout) -> Result<Self> {
        let len = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        let bytes = (len as u64).saturating_mul(4);
        ctx.check_storage_size(&format!("tensor of shape {dims:?}"), bytes)?;
        Ok(Self {
            buffer: ctx.storage_buffer("batchnorm.tensor", bytes),
            dims: dims.to_vec(),
            layout,
            ctx: ctx.clone(),
        })
    }

    /// Overwrites the contents with `data` (standard order).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the length differs.
    pub fn write(&self, data: &[f32]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::ShapeMismatch {
                what: "data written to a tensor".into(),
                expected: self.dims.clone(),
                got: vec![data.len()],
            });
        }
        self.ctx
            .queue()
            .write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Reads the tensor back as an ndarray.
    ///
    /// # Errors
    /// Device errors.
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        Ok(
            ArrayD::from_shape_vec(IxDyn(&self.dims), self.to_vec()?)
                .expect("shape matches length"),
        )
    }

    /// Reads the tensor back in standard order.
    ///
    /// # Errors
    /// Device errors.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.ctx.read_f32(&self.buffer, self.len())
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.dims
    }

    /// Layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Element count.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The context (device) the tensor lives on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The underlying buffer, for applications that bind it in their own passes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

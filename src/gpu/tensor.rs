//! Device-resident tensors.

use super::context::GpuContext;
use crate::error::{Error, Result};
use crate::layout::{DType, Layout};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// A contiguous tensor that lives in a GPU buffer, with its shape, layout and
/// storage type (f32, or f16 on adapters with `SHADER_F16`).
///
/// Outputs of one BatchNorm call can be fed to the next without a round trip
/// through the host.
///
/// ```no_run
/// use ndarray::ArrayD;
/// use wgpu_batchnorm::{DType, GpuContext, GpuTensor, Layout};
/// let ctx = GpuContext::new()?;
/// let x = ArrayD::<f32>::ones(vec![2, 3, 4]);
/// let t = GpuTensor::from_array(&ctx, x.view(), Layout::ChannelsFirst)?;
/// assert_eq!(t.to_array()?, x);
/// let h = GpuTensor::from_array_as(&ctx, x.view(), Layout::ChannelsFirst, DType::F16)?; // needs SHADER_F16
/// assert_eq!(h.to_array()?, x);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GpuTensor {
    pub(crate) buffer: wgpu::Buffer,
    dims: Vec<usize>,
    layout: Layout,
    dtype: DType,
    ctx: GpuContext,
}

/// Errors unless `ctx` can store `dtype`.
pub(crate) fn check_dtype_supported(ctx: &GpuContext, dtype: DType) -> Result<()> {
    if dtype == DType::F16 && !ctx.features().contains(wgpu::Features::SHADER_F16) {
        return Err(Error::Unsupported {
            adapter: ctx.label(),
            what: "f16 storage needs the SHADER_F16 feature, which this adapter lacks; use f32 tensors"
                .into(),
        });
    }
    Ok(())
}

fn check_len(dims: &[usize], got: usize) -> Result<()> {
    let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if len != Some(got) {
        return Err(Error::ShapeMismatch {
            what: "tensor data".into(),
            expected: dims.to_vec(),
            got: vec![got],
        });
    }
    Ok(())
}

impl GpuTensor {
    /// Uploads `x` as f32 (any memory order; it is stored in standard order).
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits.
    pub fn from_array(ctx: &GpuContext, x: ArrayViewD<'_, f32>, layout: Layout) -> Result<Self> {
        Self::from_array_as(ctx, x, layout, DType::F32)
    }

    /// Uploads `x` stored as `dtype` (f16: rounded to nearest on the host).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for f16 on an adapter without `SHADER_F16`;
    /// [`Error::TooLarge`] past the device's buffer limits.
    pub fn from_array_as(
        ctx: &GpuContext,
        x: ArrayViewD<'_, f32>,
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        let std = x.as_standard_layout();
        let data = std.as_slice().expect("standard layout is contiguous");
        Self::from_slice_as(ctx, data, x.shape(), layout, dtype)
    }

    /// Uploads f32 `data` in standard (row-major) order with shape `dims`.
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
        Self::from_slice_as(ctx, data, dims, layout, DType::F32)
    }

    /// Uploads f32 `data` in standard order with shape `dims`, stored as `dtype`.
    ///
    /// # Errors
    /// As [`GpuTensor::from_slice`], and [`Error::Unsupported`] for f16 on an
    /// adapter without `SHADER_F16`.
    pub fn from_slice_as(
        ctx: &GpuContext,
        data: &[f32],
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        check_len(dims, data.len())?;
        match dtype {
            DType::F32 => Self::upload(ctx, bytemuck::cast_slice(data), dims, layout, dtype),
            DType::F16 => {
                let halves: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
                Self::from_slice_f16(ctx, &halves, dims, layout)
            }
        }
    }

    /// Uploads f16 `data` in standard order with shape `dims`.
    ///
    /// # Errors
    /// As [`GpuTensor::from_slice_as`].
    pub fn from_slice_f16(
        ctx: &GpuContext,
        data: &[half::f16],
        dims: &[usize],
        layout: Layout,
    ) -> Result<Self> {
        check_len(dims, data.len())?;
        Self::upload(ctx, bytemuck::cast_slice(data), dims, layout, DType::F16)
    }

    fn upload(
        ctx: &GpuContext,
        bytes: &[u8],
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        check_dtype_supported(ctx, dtype)?;
        ctx.check_storage_size(
            &format!("{dtype} tensor of shape {dims:?}"),
            bytes.len() as u64,
        )?;
        Ok(Self {
            buffer: ctx.storage_buffer_init("batchnorm.tensor", bytes),
            dims: dims.to_vec(),
            layout,
            dtype,
            ctx: ctx.clone(),
        })
    }

    /// An f32 tensor of shape `dims` whose contents are unspecified until written.
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits.
    pub fn uninit(ctx: &GpuContext, dims: &[usize], layout: Layout) -> Result<Self> {
        Self::uninit_as(ctx, dims, layout, DType::F32)
    }

    /// A tensor of `dtype` and shape `dims` whose contents are unspecified until written.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for f16 without `SHADER_F16`; [`Error::TooLarge`].
    pub fn uninit_as(
        ctx: &GpuContext,
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        check_dtype_supported(ctx, dtype)?;
        let len = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        let bytes = (len as u64).saturating_mul(dtype.size() as u64);
        ctx.check_storage_size(&format!("{dtype} tensor of shape {dims:?}"), bytes)?;
        Ok(Self {
            buffer: ctx.storage_buffer("batchnorm.tensor", bytes),
            dims: dims.to_vec(),
            layout,
            dtype,
            ctx: ctx.clone(),
        })
    }

    /// Overwrites the contents with `data` (standard order; rounded for f16).
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
        let q = self.ctx.queue();
        match self.dtype {
            DType::F32 => q.write_buffer(&self.buffer, 0, bytemuck::cast_slice(data)),
            DType::F16 => {
                let mut halves: Vec<half::f16> =
                    data.iter().map(|&v| half::f16::from_f32(v)).collect();
                if halves.len() % 2 == 1 {
                    halves.push(half::f16::ZERO); // writes are whole 4-byte words
                }
                q.write_buffer(&self.buffer, 0, bytemuck::cast_slice(&halves));
            }
        }
        Ok(())
    }

    /// Reads the tensor back as an f32 ndarray (f16 widened).
    ///
    /// # Errors
    /// Device errors.
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        Ok(
            ArrayD::from_shape_vec(IxDyn(&self.dims), self.to_vec()?)
                .expect("shape matches length"),
        )
    }

    /// Reads the tensor back in standard order (f16 widened to f32).
    ///
    /// # Errors
    /// Device errors.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.ctx.read_f32(&self.buffer, self.len()),
            DType::F16 => Ok(self.to_vec_f16()?.iter().map(|v| v.to_f32()).collect()),
        }
    }

    /// Reads an f16 tensor back as f16 values.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] for an f32 tensor; device errors.
    pub fn to_vec_f16(&self) -> Result<Vec<half::f16>> {
        if self.dtype != DType::F16 {
            return Err(Error::DTypeMismatch {
                what: "tensor read as f16".into(),
                expected: "f16".into(),
                got: self.dtype.to_string(),
            });
        }
        let bytes = self.ctx.read_bytes(&self.buffer, (self.len() * 2) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.dims
    }

    /// Layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Storage type.
    pub fn dtype(&self) -> DType {
        self.dtype
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

    /// Errors unless the tensor lives on `ctx`'s device; `what` names it.
    pub(crate) fn check_device(&self, what: &str, ctx: &GpuContext) -> Result<()> {
        if self.ctx.id() != ctx.id() {
            return Err(Error::DeviceMismatch {
                what: what.into(),
                expected: ctx.id(),
                expected_name: ctx.label(),
                got: self.ctx.id(),
                got_name: self.ctx.label(),
            });
        }
        Ok(())
    }

    /// The underlying buffer, for applications that bind it in their own passes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

//! Device-resident tensors: views of a buffer at a byte offset.

use super::context::GpuContext;
use super::device::check_usage;
use crate::error::{Error, Result};
use crate::layout::{DType, Layout};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::future::Future;

/// A contiguous tensor in a GPU buffer: a view of `buffer` from byte `offset`,
/// with shape, layout and storage type (f32, or f16 on every adapter: the
/// same bytes whether the kernels read them as WGSL's `f16` or, without
/// `SHADER_F16`, as pairs in `u32` words).
///
/// The buffer is this crate's ([`GpuTensor::from_array`],
/// [`GpuTensor::uninit`], ...) or the app's own ([`GpuTensor::from_buffer`]).
/// Outputs of one BatchNorm call can be fed to the next, or to the app's own
/// kernels, without a round trip through the host. A view occupies
/// `len * dtype.size()` bytes rounded up to a multiple of 4 (an odd-length f16
/// view owns the two bytes after its last element: BatchNorm's kernels keep
/// their bits, [`GpuTensor::write`] writes them as zero). Cloning a
/// `GpuTensor` clones the view, not the data.
///
/// ```no_run
/// use ndarray::ArrayD;
/// use wgpu_batchnorm::{DType, GpuContext, GpuTensor, Layout};
/// let ctx = GpuContext::new()?;
/// let x = ArrayD::<f32>::ones(vec![2, 3, 4]);
/// let t = GpuTensor::from_array(&ctx, x.view(), Layout::ChannelsFirst)?;
/// assert_eq!(t.to_array()?, x);
/// let h = GpuTensor::from_array_as(&ctx, x.view(), Layout::ChannelsFirst, DType::F16)?;
/// assert_eq!(h.to_array()?, x);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    offset: u64,
    dims: Vec<usize>,
    layout: Layout,
    dtype: DType,
    ctx: GpuContext,
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

/// Bytes of a tensor of `dims` stored as `dtype` (saturating), and a
/// description for errors.
fn tensor_bytes(dims: &[usize], dtype: DType) -> (u64, String) {
    let len = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    (
        len.saturating_mul(dtype.size() as u64),
        format!("{dtype} tensor of shape {dims:?}"),
    )
}

impl GpuTensor {
    /// Uploads `x` as f32 (any memory order; it is stored in standard order).
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits (checked before
    /// anything is copied or allocated).
    pub fn from_array(ctx: &GpuContext, x: ArrayViewD<'_, f32>, layout: Layout) -> Result<Self> {
        Self::from_array_as(ctx, x, layout, DType::F32)
    }

    /// Uploads `x` stored as `dtype` (f16: rounded to nearest on the host).
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits (checked before
    /// anything is copied or allocated).
    pub fn from_array_as(
        ctx: &GpuContext,
        x: ArrayViewD<'_, f32>,
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        let (bytes, what) = tensor_bytes(x.shape(), dtype);
        ctx.check_tensor_size(&what, bytes)?;
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
    /// As [`GpuTensor::from_slice`].
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
        ctx.check_tensor_size(&tensor_bytes(dims, dtype).1, bytes.len() as u64)?;
        let buffer = ctx.storage_buffer_init("batchnorm.tensor", bytes)?;
        Ok(Self::view(ctx, &buffer, 0, dims, layout, dtype))
    }

    /// An f32 tensor of shape `dims` whose contents are unspecified until written.
    ///
    /// # Errors
    /// [`Error::TooLarge`] past the device's buffer limits; [`Error::Wgpu`]
    /// when the device is out of memory.
    pub fn uninit(ctx: &GpuContext, dims: &[usize], layout: Layout) -> Result<Self> {
        Self::uninit_as(ctx, dims, layout, DType::F32)
    }

    /// A tensor of `dtype` and shape `dims` whose contents are unspecified until written.
    ///
    /// # Errors
    /// [`Error::TooLarge`]; [`Error::Wgpu`] when the device is out of memory.
    pub fn uninit_as(
        ctx: &GpuContext,
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        let (bytes, what) = tensor_bytes(dims, dtype);
        ctx.check_tensor_size(&what, bytes)?;
        let buffer = ctx.storage_buffer("batchnorm.tensor", bytes)?;
        Ok(Self::view(ctx, &buffer, 0, dims, layout, dtype))
    }

    /// A view of the app's own `buffer` from byte `offset`: a tensor of shape
    /// `dims`, `layout` and `dtype` that BatchNorm calls read or write in
    /// place. The buffer must have been created by `ctx`'s device (wgpu
    /// cannot tell this crate which device made a buffer, so this is the
    /// caller's promise) and have `BufferUsages::STORAGE`; reading it back ([`GpuTensor::to_vec`]) also
    /// needs `COPY_SRC`, and [`GpuTensor::write`] needs `COPY_DST`.
    ///
    /// ```no_run
    /// use wgpu_batchnorm::{DType, GpuContext, GpuTensor, Layout};
    /// let ctx = GpuContext::new()?;
    /// let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
    ///     label: Some("app activations"),
    ///     size: 1 << 20,
    ///     usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    ///     mapped_at_creation: false,
    /// });
    /// let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    /// let x = GpuTensor::from_buffer(&ctx, &buffer, 4 * align, &[8, 16, 32], Layout::ChannelsFirst, DType::F32)?;
    /// assert_eq!(x.offset(), 4 * align);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::BufferUsage`] without `STORAGE`; [`Error::Misaligned`] when
    /// `offset` is not a multiple of the device's
    /// `min_storage_buffer_offset_alignment`; [`Error::BufferTooSmall`] when
    /// the view runs past the buffer's end; [`Error::TooLarge`] past
    /// `max_buffer_size` (a view larger than `max_storage_buffer_binding_size`
    /// is fine: BatchNorm binds it in chunks of rows).
    pub fn from_buffer(
        ctx: &GpuContext,
        buffer: &wgpu::Buffer,
        offset: u64,
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Result<Self> {
        let (bytes, what) = tensor_bytes(dims, dtype);
        check_usage(&what, buffer, wgpu::BufferUsages::STORAGE)?;
        let alignment = u64::from(ctx.limits().min_storage_buffer_offset_alignment).max(4);
        if !offset.is_multiple_of(alignment) {
            return Err(Error::Misaligned {
                what,
                offset,
                alignment,
            });
        }
        ctx.check_tensor_size(&what, bytes)?;
        let end = offset.saturating_add(bytes.next_multiple_of(4));
        if end > buffer.size() {
            return Err(Error::BufferTooSmall {
                what,
                offset,
                end,
                size: buffer.size(),
            });
        }
        Ok(Self::view(ctx, buffer, offset, dims, layout, dtype))
    }

    /// A view without checks, for buffers this crate laid out itself.
    pub(crate) fn view(
        ctx: &GpuContext,
        buffer: &wgpu::Buffer,
        offset: u64,
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Self {
        Self {
            buffer: buffer.clone(),
            offset,
            dims: dims.to_vec(),
            layout,
            dtype,
            ctx: ctx.clone(),
        }
    }

    /// Overwrites the contents with `data` (standard order; rounded for f16).
    /// Like `wgpu::Queue::write_buffer`, the write lands before the next
    /// submit's commands.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the length differs; [`Error::BufferUsage`]
    /// when the buffer lacks `COPY_DST`.
    pub fn write(&self, data: &[f32]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::ShapeMismatch {
                what: "data written to a tensor".into(),
                expected: self.dims.clone(),
                got: vec![data.len()],
            });
        }
        check_usage(
            "tensor written from the host",
            &self.buffer,
            wgpu::BufferUsages::COPY_DST,
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let q = self.ctx.queue();
        match self.dtype {
            DType::F32 => q.write_buffer(&self.buffer, self.offset, bytemuck::cast_slice(data)),
            DType::F16 => {
                let mut halves: Vec<half::f16> =
                    data.iter().map(|&v| half::f16::from_f32(v)).collect();
                if halves.len() % 2 == 1 {
                    halves.push(half::f16::ZERO); // writes are whole 4-byte words
                }
                q.write_buffer(&self.buffer, self.offset, bytemuck::cast_slice(&halves));
            }
        }
        Ok(())
    }

    /// Reads the tensor back as an f32 ndarray (f16 widened), waiting for the device.
    ///
    /// # Errors
    /// [`Error::BufferUsage`] without `COPY_SRC`; device errors.
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        Ok(
            ArrayD::from_shape_vec(IxDyn(&self.dims), self.to_vec()?)
                .expect("shape matches length"),
        )
    }

    /// Reads the tensor back in standard order (f16 widened to f32), waiting
    /// for the device.
    ///
    /// # Errors
    /// [`Error::BufferUsage`] without `COPY_SRC`; device errors.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        let bytes = self
            .ctx
            .read_bytes(&self.buffer, self.offset, self.bytes())?;
        Ok(widen(self.dtype, &bytes))
    }

    /// Reads the tensor back without waiting: submits a copy to a staging
    /// buffer now, and returns a future that resolves to the values (f16
    /// widened) once the device has run the copy. The future makes progress
    /// only while the device is polled: an app that does not call
    /// `wgpu::Device::poll` elsewhere calls it with `PollType::Poll` in its
    /// loop, or waits with `PollType::wait_indefinitely()`.
    ///
    /// ```no_run
    /// use wgpu_batchnorm::{GpuContext, GpuTensor, Layout};
    /// let ctx = GpuContext::new()?;
    /// let t = GpuTensor::from_slice(&ctx, &[1.0, 2.0], &[2, 1], Layout::ChannelsFirst)?;
    /// let pending = t.read_async()?;
    /// ctx.device().poll(wgpu::PollType::wait_indefinitely()).expect("poll");
    /// assert_eq!(pollster::block_on(pending)?, vec![1.0, 2.0]);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::BufferUsage`] without `COPY_SRC`; device errors when the
    /// copy cannot be submitted (now) or the buffer cannot be mapped (from the future).
    pub fn read_async(
        &self,
    ) -> Result<impl Future<Output = Result<Vec<f32>>> + Send + 'static + use<>> {
        let pending = self
            .ctx
            .read_bytes_async(&self.buffer, self.offset, self.bytes())?;
        let dtype = self.dtype;
        Ok(async move { Ok(widen(dtype, &pending.await?)) })
    }

    /// Reads an f16 tensor back as f16 values.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] for an f32 tensor; as [`GpuTensor::to_vec`].
    pub fn to_vec_f16(&self) -> Result<Vec<half::f16>> {
        if self.dtype != DType::F16 {
            return Err(Error::DTypeMismatch {
                what: "tensor read as f16".into(),
                expected: "f16".into(),
                got: self.dtype.to_string(),
            });
        }
        let bytes = self
            .ctx
            .read_bytes(&self.buffer, self.offset, self.bytes())?;
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

    /// Bytes of the elements (`len * dtype.size()`).
    pub fn bytes(&self) -> u64 {
        (self.len() * self.dtype.size()) as u64
    }

    /// The context (device) the tensor lives on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Errors unless the tensor was made with `ctx`; `what` names it. (wgpu
    /// compares devices by an id that can repeat across instances, so the
    /// context, made once per device, is what tells devices apart.)
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

    /// The underlying buffer, for applications that bind it in their own
    /// passes (the tensor starts at [`GpuTensor::offset`]).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Byte offset of the first element in [`GpuTensor::buffer`].
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The view as a binding: its bytes rounded up to a multiple of 4.
    pub fn binding(&self) -> wgpu::BufferBinding<'_> {
        self.range_binding(0, self.len() as u64)
    }

    /// Elements `first..first + len` of the view as a binding, its bytes
    /// rounded up to a multiple of 4 (the caller keeps the start aligned).
    pub(crate) fn range_binding(&self, first: u64, len: u64) -> wgpu::BufferBinding<'_> {
        let size = self.dtype.size() as u64;
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset + first * size,
            size: wgpu::BufferSize::new((len * size).max(1).next_multiple_of(4)),
        }
    }
}

/// Values of `bytes` holding `dtype` elements, widened to f32.
fn widen(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(bytes),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    }
}

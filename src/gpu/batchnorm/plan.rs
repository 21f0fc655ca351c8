//! The plan of one call: its parameters, and the chunks of whole rows in
//! which it binds the big tensors when they pass one storage binding.
//!
//! A tensor of `outer` rows of `C * inner` elements (a row is one sample
//! channels-first, one position channels-last) is bound in chunks of whole
//! rows, each starting at a multiple of the device's
//! `min_storage_buffer_offset_alignment` and no larger than
//! `max_storage_buffer_binding_size`. A row fixes every element's channel,
//! so the elementwise passes run on each chunk as on a tensor of their own;
//! the reductions write each chunk's slices into their own partial slots,
//! and the finalize passes merge the slots of every chunk (see
//! `slice_count` in shaders/common.wgsl).

use super::GpuBatchNorm;
use super::grid::{ElementGrid, ReduceGrid};
use crate::error::{Error, Result};
use crate::gpu::kernels::Params;
use crate::layout::DType;
use crate::shaders::{FLAG_CUMULATIVE, FLAG_LANE_CHANNELS, FLAG_UPDATE_RUNNING};
use crate::shape::ChannelWalk;

/// One bound chunk of whole rows.
#[derive(Debug, Clone)]
pub(super) struct Chunk {
    /// First element of the chunk in the tensor.
    pub first: u64,
    /// Elements in the chunk.
    pub len: u64,
    /// The parameters of the passes that walk the chunk.
    pub p: Params,
    /// The reductions' items are vec4s; their workgroups.
    pub reduce: (bool, u32),
    /// The elementwise passes' items are vec4s; their workgroups.
    pub elements: (bool, u32),
}

/// The parameters of one call.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// The parameters of the per-channel passes (finalize, coefficients):
    /// the whole tensor, every chunk's partial slots.
    pub whole: Params,
    /// The chunks, in order; one when the tensors fit one binding.
    pub chunks: Vec<Chunk>,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl GpuBatchNorm {
    /// Caps the bytes of one binding of the big tensors below the device's
    /// `max_storage_buffer_binding_size` (`None`: the device limit). Larger
    /// tensors are bound in chunks of whole rows; a low cap lets small
    /// tensors exercise that path.
    ///
    /// # Errors
    /// [`Error::Config`] for `Some(0)`.
    pub fn set_max_binding_bytes(&mut self, cap: Option<u64>) -> Result<()> {
        if cap == Some(0) {
            return Err(Error::Config("binding bytes must be at least 1".into()));
        }
        self.max_binding = cap;
        Ok(())
    }

    /// Rows per chunk for `walk` stored as `dtype`: all of them when the
    /// tensor fits one binding.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the tensor has 2^32 elements or more, or when
    /// the fewest rows a chunk can hold (whole rows from an aligned offset)
    /// pass one binding.
    fn chunk_rows(&self, walk: &ChannelWalk, dtype: DType) -> Result<u64> {
        let what = || format!("{dtype} tensor of shape {:?}", walk.dims);
        let total = walk.len() as u64;
        if total > u64::from(u32::MAX) {
            return Err(Error::TooLarge {
                what: what(),
                bytes: total * dtype.size() as u64,
                limit_name: "2^32 - 1 elements (u32 indices)",
                limit: u64::from(u32::MAX) * dtype.size() as u64,
            });
        }
        let limits = self.ctx.limits();
        let limit = self
            .max_binding
            .map_or(limits.max_storage_buffer_binding_size, |cap| {
                cap.min(limits.max_storage_buffer_binding_size)
            });
        let outer = walk.outer as u64;
        let row_bytes = (walk.channels * walk.inner * dtype.size()) as u64;
        if (outer * row_bytes).next_multiple_of(4) <= limit {
            return Ok(outer);
        }
        // Chunks start every `step` rows: a multiple of the offset alignment.
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
        let step = align / gcd(row_bytes, align);
        let rows = limit / row_bytes / step * step;
        if rows == 0 {
            return Err(Error::TooLarge {
                what: format!(
                    "{}: {step} row(s) of {} elements, the fewest a chunk of it can hold at the device's offset alignment of {align} bytes",
                    what(),
                    walk.channels * walk.inner
                ),
                bytes: step * row_bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit,
            });
        }
        Ok(rows)
    }

    /// The plan of a call on `walk` stored as `dtype`, with `flags`.
    ///
    /// # Errors
    /// As [`GpuBatchNorm::chunk_rows`].
    pub(super) fn plan(&self, walk: &ChannelWalk, dtype: DType, flags: u32) -> Result<Plan> {
        let rows = self.chunk_rows(walk, dtype)? as u32;
        let (outer, channels, inner) = (walk.outer as u32, walk.channels as u32, walk.inner as u32);
        let m = outer * inner;
        let cumulative = if self.config.momentum.is_none() {
            FLAG_CUMULATIVE
        } else {
            0
        };
        // Every chunk's slices are as long as a full chunk's.
        let full = ReduceGrid::new(rows, channels, inner, self.fill, self.slice_len);
        let row = u64::from(channels * inner);
        let mut chunks = Vec::with_capacity(outer.div_ceil(rows) as usize);
        let mut slots = 0;
        for row0 in (0..outer).step_by(rows as usize) {
            let rows_j = rows.min(outer - row0);
            let red = ReduceGrid::new(rows_j, channels, inner, self.fill, Some(full.slice_len));
            let grid = ElementGrid::new(rows_j * channels * inner, channels, inner);
            let lanes = if red.lane_channels {
                FLAG_LANE_CHANNELS
            } else {
                0
            };
            // only the first chunk's statistics pass counts the batch
            let own = if row0 == 0 {
                flags
            } else {
                flags & !FLAG_UPDATE_RUNNING
            };
            let p = Params {
                channels,
                outer: rows_j,
                inner,
                total: rows_j * channels * inner,
                slices: red.slices,
                slice_len: red.slice_len,
                per_channel: rows_j * inner,
                flags: own | cumulative | lanes,
                eps: self.config.eps as f32,
                momentum: self.config.momentum.unwrap_or(0.0) as f32,
                unbias: if m > 1 {
                    m as f32 / (m - 1) as f32
                } else {
                    0.0
                },
                inv_m: 1.0 / m as f32,
                state_stride: self.stride as u32,
                band: grid.band,
                steps: grid.steps,
                band_cols: grid.cols,
                red_cols: red.cols,
                red_inner: red.inner,
                red_tx: red.tx,
                red_major: u32::from(red.column_major),
                chunk_m: rows_j * inner,
                part_base: slots,
                part_stride: 0,
                pad0: 0,
            };
            slots += red.slices;
            chunks.push(Chunk {
                first: u64::from(row0) * row,
                len: u64::from(rows_j) * row,
                p,
                reduce: (red.vec4, red.workgroups),
                elements: (grid.vec4, grid.workgroups),
            });
        }
        for c in &mut chunks {
            c.p.part_stride = slots;
        }
        let first = &chunks[0].p;
        let whole = Params {
            outer,
            total: outer * channels * inner,
            slices: slots,
            slice_len: full.slice_len,
            per_channel: m,
            flags: flags | (first.flags & !FLAG_UPDATE_RUNNING),
            chunk_m: rows * inner,
            ..*first
        };
        Ok(Plan { whole, chunks })
    }
}

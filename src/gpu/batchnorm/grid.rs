//! The grids of the passes that walk the big tensors: [`ElementGrid`] for
//! the elementwise passes (`normalize`, `backward_dx`; `band_walk` in
//! shaders/common.wgsl is its other half) and [`ReduceGrid`] for the
//! reductions (`stats_partial`, `backward_partial`; shaders/reduce.wgsl).
//!
//! A tensor of `outer * C * inner` elements is `rows` rows of `C * inner`
//! elements (one sample channels-first, one position channels-last), and an
//! element's place in its row fixes its channel. The passes walk items (vec4s
//! when a row is a multiple of 4 elements, else single elements) in bands of
//! whole rows: each thread owns one position of a band, works out its
//! channel(s) and loads their coefficients once, then steps through `steps`
//! bands, `band` items apart, with no division per element.

use crate::shaders::WG;

/// Most bands one thread walks.
const MAX_STEPS: u32 = 8;
/// Items per thread stay at 1 until the tensor has this many threads' worth
/// of items: small tensors keep their parallelism.
const MIN_THREADS: u32 = 1 << 15;
/// Rows a band may hold beyond the fewest that fill a workgroup.
const MAX_EXTRA_ROWS: u32 = 64;

/// The grid of one elementwise pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ElementGrid {
    /// Items are vec4s (the row length is a multiple of 4).
    pub vec4: bool,
    /// Items per band (whole rows).
    pub band: u32,
    /// Bands a thread walks.
    pub steps: u32,
    /// Workgroups across one band.
    pub cols: u32,
    /// Workgroups in all.
    pub workgroups: u32,
}

impl ElementGrid {
    /// The grid for `total` elements in rows of `channels * inner`.
    pub fn new(total: u32, channels: u32, inner: u32) -> Self {
        let row_elems = (channels * inner).max(1);
        let vec4 = row_elems.is_multiple_of(4);
        let unit = if vec4 { 4 } else { 1 };
        let row = row_elems / unit;
        let items = (total / unit).max(1);
        // The fewest rows whose band leaves at most 1/8 of its workgroups'
        // threads idle (a band of one row when rows are long).
        let first = (WG / row).max(1);
        let rows = (first..=first + MAX_EXTRA_ROWS)
            .find(|&b| {
                let band = u64::from(b) * u64::from(row);
                band * 8 >= band.next_multiple_of(u64::from(WG)) * 7
            })
            .unwrap_or(first);
        let band = row.saturating_mul(rows).min(items.next_multiple_of(row));
        let cols = band.div_ceil(WG);
        let bands = items.div_ceil(band);
        let steps = (items / MIN_THREADS).clamp(1, MAX_STEPS).min(bands);
        Self {
            vec4,
            band,
            steps,
            cols,
            workgroups: cols * bands.div_ceil(steps),
        }
    }
}

/// How a device likes its reductions: about `workgroups` workgroups in all,
/// and at least `positions` positions (items) per thread when the slices are
/// chosen from the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fill {
    pub workgroups: u32,
    pub positions: u32,
}

impl Fill {
    /// The fill of an adapter. A GPU: enough workgroups for the largest
    /// (about 8 resident on each of 100-150 multiprocessors, twice over),
    /// 8 positions per thread. A CPU adapter (Mesa's lavapipe and llvmpipe
    /// run one workgroup at a time per host thread, its invocations in turn
    /// between barriers): host threads times 4 workgroups, and 128 positions
    /// per thread, so that few threads share a channel and the workgroup
    /// merge (one barrier per level) stays short; measured on lavapipe,
    /// 32x1024x7x7 training forward took about half the time with 128 as
    /// with 8 (BENCHMARKS.md).
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        match info.device_type {
            wgpu::DeviceType::Cpu => {
                let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
                Self {
                    workgroups: (threads as u32).saturating_mul(4),
                    positions: 128,
                }
            }
            wgpu::DeviceType::IntegratedGpu => Self {
                workgroups: 512,
                positions: 8,
            },
            _ => Self {
                workgroups: 2048,
                positions: 8,
            },
        }
    }
}

/// The grid of one reduction pass (shaders/reduce.wgsl): the tensor as
/// `outer` rows of `cols` columns of runs of `inner` items, a column being
/// one channel or (channels-last, C a multiple of 4) four adjacent channels;
/// a workgroup owns one slice of a block of `tx` columns, `WG / tx` threads
/// per column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReduceGrid {
    /// Items are vec4s.
    pub vec4: bool,
    /// The lanes of an item are four channels (`FLAG_LANE_CHANNELS`).
    pub lane_channels: bool,
    /// Columns of a row, in items.
    pub cols: u32,
    /// Items per run of a column.
    pub inner: u32,
    /// Columns of a workgroup's block (a power of two).
    pub tx: u32,
    /// The threads of a column are neighbours (channels-first), else the
    /// threads of a row (channels-last).
    pub column_major: bool,
    /// Slices per channel.
    pub slices: u32,
    /// Elements of a channel per slice.
    pub slice_len: u32,
    /// Workgroups in all.
    pub workgroups: u32,
}

impl ReduceGrid {
    /// The grid for `outer * channels * inner` elements on a device that
    /// likes `fill`, or with slices of `slice_len` elements of a channel
    /// (rounded up to whole items).
    pub fn new(outer: u32, channels: u32, inner: u32, fill: Fill, slice_len: Option<u32>) -> Self {
        // (vec4 items, lanes are channels, columns, items per run, elements per position)
        let (vec4, lane_channels, cols, run, per_pos) = match (inner, channels % 4) {
            (1, 0) => (true, true, channels / 4, 1, 1),
            (1, _) => (false, false, channels, 1, 1),
            (i, _) if i % 4 == 0 => (true, false, channels, i / 4, 4),
            (i, _) => (false, false, channels, i, 1),
        };
        let positions = (outer * inner / per_pos).max(1);
        let column_major = inner > 1;
        // Channels-first, a column gets as many threads as it has positions
        // for (up to the whole workgroup), and the workgroup's other threads
        // go to further channels; channels-last, the threads of a row cover
        // the row's columns (up to the whole workgroup).
        let tx = if column_major {
            let per_col = (positions / fill.positions).clamp(1, WG);
            WG / prev_power_of_two(per_col)
        } else {
            cols.next_power_of_two().min(WG)
        }
        .min(cols.next_power_of_two());
        let blocks = cols.div_ceil(tx);
        let slice_pos = match slice_len {
            Some(n) => n.div_ceil(per_pos),
            None => {
                let most = (positions / (WG / tx * fill.positions)).max(1);
                positions.div_ceil(fill.workgroups.div_ceil(blocks).clamp(1, most))
            }
        }
        .clamp(1, positions);
        let slices = positions.div_ceil(slice_pos);
        Self {
            vec4,
            lane_channels,
            cols,
            inner: run,
            tx,
            column_major,
            slices,
            slice_len: slice_pos * per_pos,
            workgroups: blocks * slices,
        }
    }
}

/// The largest power of two not above `n` (`n` >= 1).
fn prev_power_of_two(n: u32) -> u32 {
    1 << (31 - n.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The large shapes of `elementwise_grids` in tests/parity.rs walk
    /// several bands per thread.
    #[test]
    fn parity_shapes_take_several_steps() {
        for (total, channels, inner) in [
            (8 * 16 * 48 * 48, 16, 48 * 48),
            (16 * 12 * 12 * 128, 128, 1),
            (9001 * 33, 33, 1),
        ] {
            let g = ElementGrid::new(total, channels, inner);
            assert!(
                g.steps > 1,
                "{total} in rows of {channels} x {inner}: {g:?}"
            );
        }
    }

    /// `(outer, channels, inner)` of the coverage tests: odd, tiny, wide,
    /// long, runs of every remainder by 4 and 8.
    const SHAPES: &[(u32, u32, u32)] = &[
        (2, 3, 5),
        (4, 64, 1),
        (3, 2048, 49),
        (7, 3, 1),
        (1, 1, 1),
        (600, 301, 1),
        (2, 16, 196),
        (40000, 4, 1),
        (5, 12, 8),
        (33, 8, 4),
    ];

    /// Every item is visited exactly once, by a thread whose row position
    /// fixes its channel, whatever the shape.
    #[test]
    fn bands_cover_every_item_once() {
        for &(outer, channels, inner) in SHAPES {
            let total = outer * channels * inner;
            let g = ElementGrid::new(total, channels, inner);
            let unit = if g.vec4 { 4 } else { 1 };
            let (items, row) = (total / unit, channels * inner / unit);
            assert_eq!(g.band % row, 0, "{outer}x{channels}x{inner}: {g:?}");
            let mut seen = vec![0u8; items as usize];
            for w in 0..g.workgroups {
                let group = w / g.cols;
                for lid in 0..WG {
                    let j0 = (w % g.cols) * WG + lid;
                    if j0 >= g.band {
                        continue;
                    }
                    let mut j = group * g.steps * g.band + j0;
                    for _ in 0..g.steps {
                        if j >= items {
                            break;
                        }
                        assert_eq!(j % row, j0 % row);
                        seen[j as usize] += 1;
                        j += g.band;
                    }
                }
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "{outer}x{channels}x{inner}: {g:?}"
            );
        }
    }

    /// The reduction grid visits every element of every channel exactly
    /// once, in the slice whose partial it goes to, whatever the shape,
    /// layout, fill and slice length: the walk of shaders/reduce.wgsl, step
    /// by step.
    #[test]
    fn reductions_cover_every_element_once() {
        for &(outer, channels, inner) in SHAPES {
            for (workgroups, positions) in [(1, 8), (8, 128), (2048, 8)] {
                let fill = Fill {
                    workgroups,
                    positions,
                };
                for slice_len in [None, Some(7), Some(64)] {
                    let g = ReduceGrid::new(outer, channels, inner, fill, slice_len);
                    let shape =
                        format!("{outer}x{channels}x{inner}, {fill:?}, {slice_len:?}: {g:?}");
                    let per_col = WG / g.tx;
                    let per_pos = if g.vec4 && !g.lane_channels { 4 } else { 1 };
                    let lanes = if g.lane_channels { 4 } else { 1 };
                    let m = outer * inner;
                    let mut seen = vec![0u8; (outer * channels * inner) as usize];
                    for w in 0..g.workgroups {
                        let (block, s) = (w / g.slices, w % g.slices);
                        let begin = s * (g.slice_len / per_pos);
                        let end = begin + g.slice_len.min(m - s * g.slice_len) / per_pos;
                        for lid in 0..WG {
                            let (cx, ty) = if g.column_major {
                                (lid / per_col, lid % per_col)
                            } else {
                                (lid % g.tx, lid / g.tx)
                            };
                            let col = block * g.tx + cx;
                            if col >= g.cols {
                                continue;
                            }
                            let mut pos = begin + ty;
                            while pos < end {
                                let (o, i) = (pos / g.inner, pos % g.inner);
                                let item = (o * g.cols + col) * g.inner + i;
                                let unit = if g.vec4 { 4 } else { 1 };
                                for k in 0..unit {
                                    let e = (item * unit + k) as usize;
                                    let c = (e as u32 / inner) % channels;
                                    let want = if g.lane_channels {
                                        col * lanes + k
                                    } else {
                                        col
                                    };
                                    assert_eq!(c, want, "{shape}");
                                    seen[e] += 1;
                                }
                                pos += per_col;
                            }
                        }
                    }
                    assert!(seen.iter().all(|&n| n == 1), "{shape}");
                    assert_eq!(g.slices, m.div_ceil(g.slice_len), "{shape}");
                }
            }
        }
    }

    /// Slices follow the device: a CPU adapter's few workgroups take whole
    /// channels, a GPU's many cut a channel into slices.
    #[test]
    fn slice_count_follows_the_fill() {
        let cpu = Fill {
            workgroups: 8,
            positions: 128,
        };
        let gpu = Fill {
            workgroups: 2048,
            positions: 8,
        };
        let few = ReduceGrid::new(32, 64, 56 * 56, cpu, None);
        assert_eq!(few.slices, 1, "{few:?}");
        // 64 channels of 25088 vec4s: as many slices as keep 8 vec4s per thread
        let many = ReduceGrid::new(32, 64, 56 * 56, gpu, None);
        assert_eq!(many.slices, 25088 / (WG * 8), "{many:?}");
        // short channels of 1568 positions: 12 threads' worth on a CPU
        // adapter (8 threads a channel, 32 channels a workgroup), 196 on a
        // GPU (128 threads a channel, 2 channels a workgroup)
        let short = ReduceGrid::new(32, 1024, 49, cpu, None);
        assert_eq!((short.tx, short.slices), (32, 1), "{short:?}");
        let short = ReduceGrid::new(32, 1024, 49, gpu, None);
        assert_eq!((short.tx, short.slices), (2, 1), "{short:?}");
        // channels-last: the threads of a row cover its columns
        let nhwc = ReduceGrid::new(32 * 49, 1024, 1, gpu, None);
        assert!(
            nhwc.lane_channels && nhwc.tx == 256 && !nhwc.column_major,
            "{nhwc:?}"
        );
    }
}

//! The grid of the elementwise passes (`normalize`, `backward_dx`):
//! `band_walk` in shaders/common.wgsl is its other half.
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

    /// Every item is visited exactly once, by a thread whose row position
    /// fixes its channel, whatever the shape.
    #[test]
    fn bands_cover_every_item_once() {
        for &(outer, channels, inner) in &[
            (2, 3, 5),
            (4, 64, 1),
            (3, 2048, 49),
            (7, 3, 1),
            (1, 1, 1),
            (600, 301, 1),
            (2, 16, 196),
            (40000, 4, 1),
        ] {
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
}

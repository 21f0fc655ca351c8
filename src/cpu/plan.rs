//! How the fast CPU backend cuts a tensor into rayon tasks: by channel, by
//! row (channels-last and tiny spatial sizes) or by blocks of channels in
//! memory order (short runs), and how a task walks its part.

use crate::shape::ChannelWalk;

/// Elements of one cache-resident two-pass piece.
pub(super) const PIECE: usize = 4096;
/// Elements one rayon task takes at most in the reductions and elementwise passes.
pub(super) const TASK: usize = 1 << 16;
/// Fewest elements worth a rayon task of their own.
pub(super) const MIN_TASK: usize = 1 << 13;
/// Channels-first tensors with a spatial size below this are walked by rows.
pub(super) const ROW_WALK_BELOW: usize = 16;
/// Runs shorter than this (but at least [`ROW_WALK_BELOW`]) are walked in
/// memory order, a block of channels at a time: one channel's runs lie
/// `C * inner` elements apart, too far for the prefetcher when runs are short.
pub(super) const BLOCK_WALK_BELOW: usize = 1024;
/// Positions (columns) one row-walk task accumulates at most.
pub(super) const ROW_COLS: usize = 4096;
/// Bytes of rows one row-walk or block-walk sub-block holds: usually read
/// once (one pass around the running means), a second time from L2 where
/// that pass does not stand; larger blocks merge their `f64` partials less
/// often (256 KiB to 512 KiB: moments of 32x2048x7x7 NHWC 20-30% faster).
pub(super) const ROW_BLOCK_BYTES: usize = 512 * 1024;

/// How a tensor is cut into rayon tasks.
#[derive(Debug, Clone, Copy)]
pub(super) enum Plan {
    /// Channel-major: each channel's `M` elements cut into `parts` ranges,
    /// walked run by run.
    Channels { parts: usize },
    /// Row walk: `rows` rows of `cols = C * inner` positions, cut into
    /// `row_tasks` row ranges times column blocks of [`ROW_COLS`].
    Rows { row_tasks: usize },
    /// Block walk: tasks of `block` channels times one of `row_tasks` ranges
    /// of runs (`o`), each visiting its runs in memory order.
    Blocks { block: usize, row_tasks: usize },
}

pub(super) fn plan(walk: &ChannelWalk) -> Plan {
    let threads = rayon::current_num_threads().max(1);
    let want_tasks = threads * 4;
    if walk.inner < ROW_WALK_BELOW {
        let cols = walk.channels * walk.inner;
        let col_blocks = cols.div_ceil(ROW_COLS);
        // At least 64 rows a task, so the per-task f64 accumulators stay small
        // beside the data, and at least MIN_TASK elements.
        let min_rows = 64usize.max(MIN_TASK.div_ceil(cols.min(ROW_COLS)));
        let row_tasks = want_tasks
            .div_ceil(col_blocks)
            .min((walk.outer / min_rows).max(1))
            .max(1);
        Plan::Rows { row_tasks }
    } else if walk.inner < BLOCK_WALK_BELOW {
        let block = (PIECE / walk.inner).clamp(1, walk.channels);
        let blocks = walk.channels.div_ceil(block);
        let row_tasks = want_tasks.div_ceil(blocks).clamp(1, walk.outer);
        Plan::Blocks { block, row_tasks }
    } else {
        let m = walk.per_channel();
        let by_size = m.div_ceil(TASK);
        let by_count = want_tasks.div_ceil(walk.channels);
        let parts = by_size.max(by_count).min(m.div_ceil(MIN_TASK)).max(1);
        Plan::Channels { parts }
    }
}

/// `[k * n / parts, (k+1) * n / parts)`.
pub(super) fn part_range(n: usize, parts: usize, k: usize) -> (usize, usize) {
    (k * n / parts, (k + 1) * n / parts)
}

/// Calls `f(flat_start, len)` for each contiguous piece of elements
/// `m0..m1` of channel `c`, pieces no longer than [`PIECE`].
#[inline]
pub(super) fn for_each_piece(
    walk: &ChannelWalk,
    c: usize,
    m0: usize,
    m1: usize,
    mut f: impl FnMut(usize, usize),
) {
    let inner = walk.inner;
    let mut m = m0;
    while m < m1 {
        let (o, i) = (m / inner, m % inner);
        let len = (inner - i).min(m1 - m).min(PIECE);
        f((o * walk.channels + c) * inner + i, len);
        m += len;
    }
}

/// Calls `f` with groups of consecutive pieces (see [`for_each_piece`]) of
/// at most [`PIECE`] elements in all, so that short runs (a 7x7 spatial
/// size) are reduced many at a time; `pieces` is scratch space.
#[inline]
pub(super) fn for_each_group(
    walk: &ChannelWalk,
    c: usize,
    (m0, m1): (usize, usize),
    pieces: &mut Vec<(usize, usize)>,
    mut f: impl FnMut(&[(usize, usize)]),
) {
    pieces.clear();
    let mut count = 0;
    for_each_piece(walk, c, m0, m1, |start, len| {
        if count + len > PIECE && !pieces.is_empty() {
            f(pieces);
            pieces.clear();
            count = 0;
        }
        pieces.push((start, len));
        count += len;
    });
    if !pieces.is_empty() {
        f(pieces);
    }
}

/// Rows `r0..r1` of positions `p0..p1` in a tensor of rows of `cols` positions,
/// in sub-blocks of rows that fit [`ROW_BLOCK_BYTES`].
pub(super) fn row_blocks(
    r0: usize,
    r1: usize,
    width: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let step = (ROW_BLOCK_BYTES / 4 / width.max(1)).clamp(4, 1024);
    (r0..r1).step_by(step).map(move |r| (r, (r + step).min(r1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    #[test]
    fn plans_cover_both_walks() {
        let rows = ChannelWalk::new(&[4096, 1024], Layout::ChannelsFirst).unwrap();
        assert!(matches!(plan(&rows), Plan::Rows { .. }));
        let nhwc = ChannelWalk::new(&[8, 32, 32, 64], Layout::ChannelsLast).unwrap();
        assert!(matches!(plan(&nhwc), Plan::Rows { .. }));
        let chans = ChannelWalk::new(&[8, 64, 32, 32], Layout::ChannelsFirst).unwrap();
        assert!(matches!(plan(&chans), Plan::Channels { .. }));
        let short = ChannelWalk::new(&[32, 2048, 7, 7], Layout::ChannelsFirst).unwrap();
        assert!(matches!(plan(&short), Plan::Blocks { .. }));
        // A big single channel is split over tasks.
        let big = ChannelWalk::new(&[2, 1, 1 << 17], Layout::ChannelsFirst).unwrap();
        assert!(matches!(plan(&big), Plan::Channels { parts } if parts >= 2));
    }

    #[test]
    fn pieces_tile_a_channel_exactly_once() {
        let walk = ChannelWalk::new(&[3, 2, 5000], Layout::ChannelsFirst).unwrap();
        let mut seen = vec![0u8; walk.len()];
        for c in 0..2 {
            for (m0, m1) in [(0, 4000), (4000, 15000)] {
                for_each_piece(&walk, c, m0, m1, |s, n| {
                    assert!(n <= PIECE);
                    for v in &mut seen[s..s + n] {
                        *v += 1;
                    }
                });
            }
        }
        assert!(seen.iter().all(|&v| v == 1));
    }
}

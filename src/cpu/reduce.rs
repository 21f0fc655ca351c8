//! The reductions of the fast CPU backend: per-channel moments of `x`
//! (training statistics) and per-channel sums of `dy` and `dy * (x - mean)`
//! (backward), for every walk plan.
//!
//! Each piece of at most [`PIECE`] elements is reduced by the corrected
//! two-pass algorithm while it sits in cache, in `f32` lanes, and pieces and
//! tasks merge in `f64` (Chan's formula for moments), in a fixed order.

use super::lanes::{
    Lanes, ROWS, add_centered, add_grad, add_rows, add_rows_centered, add_rows_grad, add_sum,
};
use super::plan::{PIECE, Plan, ROW_COLS, for_each_group, part_range, plan, row_blocks};
use crate::shape::ChannelWalk;
use crate::stats::Moments;
use rayon::prelude::*;

/// Moments of a cache-resident group of contiguous pieces `(start, len)` of
/// `x`, by the corrected two-pass algorithm: a first pass for the mean `m`,
/// then `sum(x - m)` and `sum((x - m)^2)`.
#[inline]
pub(super) fn group_moments(x: &[f32], pieces: &[(usize, usize)]) -> Moments {
    let count: usize = pieces.iter().map(|p| p.1).sum();
    let n = count as f64;
    let mut sum = Lanes::new();
    for &(s, len) in pieces {
        add_sum(&mut sum, &x[s..s + len]);
    }
    let m = (sum.total() / n) as f32;
    let (mut s1, mut s2) = (Lanes::new(), Lanes::new());
    for &(s, len) in pieces {
        add_centered(&mut s1, &mut s2, &x[s..s + len], m);
    }
    let (s1, s2) = (s1.total(), s2.total());
    let m2 = s2 - s1 * s1 / n;
    Moments {
        n,
        mean: f64::from(m) + s1 / n,
        // Rounding can leave a tiny negative value; NaN stays NaN.
        m2: if m2 < 0.0 { 0.0 } else { m2 },
    }
}

/// Moments of one contiguous slice (see [`group_moments`]).
#[cfg(test)]
pub(super) fn piece_moments(x: &[f32]) -> Moments {
    group_moments(x, &[(0, x.len())])
}

/// Per-channel moments of `x`.
pub(super) fn channel_moments(x: &[f32], walk: &ChannelWalk) -> Vec<Moments> {
    match plan(walk) {
        Plan::Channels { parts } => {
            let m = walk.per_channel();
            let partials: Vec<Moments> = (0..walk.channels * parts)
                .into_par_iter()
                .map(|t| {
                    let (c, k) = (t / parts, t % parts);
                    let mut acc = Moments::default();
                    let mut pieces = Vec::new();
                    for_each_group(walk, c, part_range(m, parts, k), &mut pieces, |g| {
                        acc = acc.merge(group_moments(x, g));
                    });
                    acc
                })
                .collect();
            partials
                .chunks(parts)
                .map(|p| p.iter().fold(Moments::default(), |a, &b| a.merge(b)))
                .collect()
        }
        Plan::Blocks { block, row_tasks } => {
            let c = walk.channels;
            let blocks = c.div_ceil(block);
            let partials: Vec<Vec<Moments>> = (0..blocks * row_tasks)
                .into_par_iter()
                .map(|t| {
                    let (b, rt) = (t / row_tasks, t % row_tasks);
                    let (c0, c1) = (b * block, ((b + 1) * block).min(c));
                    let (r0, r1) = part_range(walk.outer, row_tasks, rt);
                    block_moments(x, walk, (c0, c1), (r0, r1))
                })
                .collect();
            let mut out = vec![Moments::default(); c];
            for (t, part) in partials.iter().enumerate() {
                let c0 = (t / row_tasks) * block;
                for (o, p) in out[c0..].iter_mut().zip(part) {
                    *o = o.merge(*p);
                }
            }
            out
        }
        Plan::Rows { row_tasks } => {
            let cols = walk.channels * walk.inner;
            let col_blocks = cols.div_ceil(ROW_COLS);
            // Per task: (n, mean per column, M2 per column) of its block.
            let partials: Vec<(f64, Vec<f64>, Vec<f64>)> = (0..row_tasks * col_blocks)
                .into_par_iter()
                .map(|t| {
                    let (rt, cb) = (t / col_blocks, t % col_blocks);
                    let (r0, r1) = part_range(walk.outer, row_tasks, rt);
                    let (p0, p1) = (cb * ROW_COLS, ((cb + 1) * ROW_COLS).min(cols));
                    row_task_moments(x, cols, r0, r1, p0, p1)
                })
                .collect();
            // Merge the row tasks of each column in order, then the columns of a channel.
            let mut col: Vec<Moments> = vec![Moments::default(); cols];
            for (t, (n, mean, m2)) in partials.iter().enumerate() {
                let p0 = (t % col_blocks) * ROW_COLS;
                for (j, (&mu, &q)) in mean.iter().zip(m2).enumerate() {
                    col[p0 + j] = col[p0 + j].merge(Moments {
                        n: *n,
                        mean: mu,
                        m2: q,
                    });
                }
            }
            col.chunks(walk.inner)
                .map(|p| p.iter().fold(Moments::default(), |a, &b| a.merge(b)))
                .collect()
        }
    }
}

/// Moments of channels `c0..c1` over runs `r0..r1` (a [`Plan::Blocks`]
/// task): the corrected two-pass algorithm per cache-sized slab of runs, each
/// pass in memory order, slabs merged in `f64`.
pub(super) fn block_moments(
    x: &[f32],
    walk: &ChannelWalk,
    (c0, c1): (usize, usize),
    (r0, r1): (usize, usize),
) -> Vec<Moments> {
    let (c, inner, nb) = (walk.channels, walk.inner, c1 - c0);
    let run = |o: usize, j: usize| {
        let start = (o * c + c0 + j) * inner;
        &x[start..start + inner]
    };
    let mut acc = vec![Moments::default(); nb];
    let mut sums = vec![Lanes::new(); nb];
    let mut s1 = vec![Lanes::new(); nb];
    let mut s2 = vec![Lanes::new(); nb];
    let mut means = vec![0.0f32; nb];
    for (b0, b1) in row_blocks(r0, r1, nb * inner) {
        let n = ((b1 - b0) * inner) as f64;
        sums.fill(Lanes::new());
        for o in b0..b1 {
            for (j, l) in sums.iter_mut().enumerate() {
                add_sum(l, run(o, j));
            }
        }
        for (m, l) in means.iter_mut().zip(&sums) {
            *m = (l.total() / n) as f32;
        }
        s1.fill(Lanes::new());
        s2.fill(Lanes::new());
        for o in b0..b1 {
            for (j, (a1, a2)) in s1.iter_mut().zip(s2.iter_mut()).enumerate() {
                add_centered(a1, a2, run(o, j), means[j]);
            }
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let (d1, d2) = (s1[j].total(), s2[j].total());
            let m2 = d2 - d1 * d1 / n;
            *a = a.merge(Moments {
                n,
                mean: f64::from(means[j]) + d1 / n,
                m2: if m2 < 0.0 { 0.0 } else { m2 },
            });
        }
    }
    acc
}

/// Moments of every column `p0..p1` over rows `r0..r1`: per cache-sized
/// block of rows, sums of `x - m` and `(x - m)^2` in `f32` around the block
/// means (two passes) or, after the first block, around the running means
/// (one pass, checked); blocks merged in `f64`.
pub(super) fn row_task_moments(
    x: &[f32],
    cols: usize,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
) -> (f64, Vec<f64>, Vec<f64>) {
    let w = p1 - p0;
    let mut n = 0.0f64;
    let mut mean = vec![0.0f64; w];
    let mut m2 = vec![0.0f64; w];
    let mut bm = vec![0.0f32; w];
    let mut s1 = vec![0.0f32; w];
    let mut s2 = vec![0.0f32; w];
    for (b0, b1) in row_blocks(r0, r1, w) {
        let nb = (b1 - b0) as f64;
        let row = |r: usize| &x[r * cols + p0..r * cols + p1];
        let centered = |s1: &mut [f32], s2: &mut [f32], m: &[f32]| {
            s1.fill(0.0);
            s2.fill(0.0);
            for (r, step) in row_groups(b0, b1) {
                if let Some(q) = step {
                    let rows = std::array::from_fn(|k| row(r + k * q));
                    add_rows_centered::<ROWS>(s1, s2, m, rows);
                } else {
                    add_rows_centered::<1>(s1, s2, m, [row(r)]);
                }
            }
        };
        // After the first block, one pass centred on the running column
        // means; it stands where every block mean lies within one block
        // standard deviation of them (`s1^2/nb <= s2/2`, so `s2 - s1^2/nb`
        // loses at most one bit), else the block gets two passes.
        let mut one_pass = false;
        if n > 0.0 {
            for (b, &mu) in bm.iter_mut().zip(&mean) {
                *b = mu as f32;
            }
            centered(&mut s1, &mut s2, &bm);
            one_pass = s1.iter().zip(&s2).all(|(&d1, &d2)| {
                let d1 = f64::from(d1);
                d1 * d1 <= 0.5 * f64::from(d2) * nb
            });
        }
        if !one_pass {
            bm.fill(0.0);
            for (r, step) in row_groups(b0, b1) {
                if let Some(q) = step {
                    add_rows::<ROWS>(&mut bm, std::array::from_fn(|k| row(r + k * q)));
                } else {
                    add_rows::<1>(&mut bm, [row(r)]);
                }
            }
            let inv = 1.0 / (b1 - b0) as f32;
            bm.iter_mut().for_each(|a| *a *= inv);
            centered(&mut s1, &mut s2, &bm);
        }
        // Chan merge of the block into the running column moments.
        let nt = n + nb;
        let (wb, wab, inv_nb) = (nb / nt, n * nb / nt, 1.0 / nb);
        for j in 0..w {
            let (d1, d2) = (f64::from(s1[j]), f64::from(s2[j]));
            let q = d2 - d1 * d1 * inv_nb;
            let q = if q < 0.0 { 0.0 } else { q };
            let mb = f64::from(bm[j]) + d1 * inv_nb;
            let d = mb - mean[j];
            mean[j] += d * wb;
            m2[j] += q + d * d * wab;
        }
        n = nt;
    }
    (n, mean, m2)
}

/// Per-channel `(sum(dy), sum(dy * (x - center32[c])))`.
pub(super) fn channel_grad_sums(
    x: &[f32],
    dy: &[f32],
    walk: &ChannelWalk,
    center32: &[f32],
) -> Vec<(f64, f64)> {
    match plan(walk) {
        Plan::Channels { parts } => {
            let m = walk.per_channel();
            let partials: Vec<(f64, f64)> = (0..walk.channels * parts)
                .into_par_iter()
                .map(|t| {
                    let (c, k) = (t / parts, t % parts);
                    let mut acc = (0.0, 0.0);
                    let mut pieces = Vec::new();
                    for_each_group(walk, c, part_range(m, parts, k), &mut pieces, |g| {
                        let (mut s1, mut s2) = (Lanes::new(), Lanes::new());
                        for &(s, len) in g {
                            add_grad(
                                &mut s1,
                                &mut s2,
                                &x[s..s + len],
                                &dy[s..s + len],
                                center32[c],
                            );
                        }
                        acc = (acc.0 + s1.total(), acc.1 + s2.total());
                    });
                    acc
                })
                .collect();
            partials
                .chunks(parts)
                .map(|p| p.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1)))
                .collect()
        }
        Plan::Blocks { block, row_tasks } => {
            let c = walk.channels;
            let blocks = c.div_ceil(block);
            let partials: Vec<Vec<(f64, f64)>> = (0..blocks * row_tasks)
                .into_par_iter()
                .map(|t| {
                    let (b, rt) = (t / row_tasks, t % row_tasks);
                    let (c0, c1) = (b * block, ((b + 1) * block).min(c));
                    let (r0, r1) = part_range(walk.outer, row_tasks, rt);
                    // f32 lanes per channel, moved to f64 every PIECE elements.
                    let mut lanes = vec![(Lanes::new(), Lanes::new(), 0usize); c1 - c0];
                    let mut acc = vec![(0.0f64, 0.0f64); c1 - c0];
                    for o in r0..r1 {
                        for (j, ch) in (c0..c1).enumerate() {
                            let start = (o * c + ch) * walk.inner;
                            let span = start..start + walk.inner;
                            let l = &mut lanes[j];
                            add_grad(
                                &mut l.0,
                                &mut l.1,
                                &x[span.clone()],
                                &dy[span],
                                center32[ch],
                            );
                            l.2 += walk.inner;
                            if l.2 >= PIECE {
                                acc[j].0 += l.0.total();
                                acc[j].1 += l.1.total();
                                *l = (Lanes::new(), Lanes::new(), 0);
                            }
                        }
                    }
                    for (a, l) in acc.iter_mut().zip(&lanes) {
                        a.0 += l.0.total();
                        a.1 += l.1.total();
                    }
                    acc
                })
                .collect();
            let mut out = vec![(0.0f64, 0.0f64); c];
            for (t, part) in partials.iter().enumerate() {
                let c0 = (t / row_tasks) * block;
                for (o, p) in out[c0..].iter_mut().zip(part) {
                    o.0 += p.0;
                    o.1 += p.1;
                }
            }
            out
        }
        Plan::Rows { row_tasks } => {
            let cols = walk.channels * walk.inner;
            let col_blocks = cols.div_ceil(ROW_COLS);
            let center_col: Vec<f32> = (0..cols).map(|p| center32[p / walk.inner]).collect();
            let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..row_tasks * col_blocks)
                .into_par_iter()
                .map(|t| {
                    let (rt, cb) = (t / col_blocks, t % col_blocks);
                    let (r0, r1) = part_range(walk.outer, row_tasks, rt);
                    let (p0, p1) = (cb * ROW_COLS, ((cb + 1) * ROW_COLS).min(cols));
                    row_task_grad_sums(x, dy, cols, &center_col[p0..p1], r0, r1, p0)
                })
                .collect();
            let mut col = vec![(0.0f64, 0.0f64); cols];
            for (t, (a, b)) in partials.iter().enumerate() {
                let p0 = (t % col_blocks) * ROW_COLS;
                for (j, (&u, &v)) in a.iter().zip(b).enumerate() {
                    col[p0 + j].0 += u;
                    col[p0 + j].1 += v;
                }
            }
            col.chunks(walk.inner)
                .map(|p| p.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1)))
                .collect()
        }
    }
}

/// Column sums of `dy` and `dy * (x - center)` over rows `r0..r1`, columns
/// `p0..p0 + center.len()`: `f32` within a block of rows, `f64` across blocks.
pub(super) fn row_task_grad_sums(
    x: &[f32],
    dy: &[f32],
    cols: usize,
    center: &[f32],
    r0: usize,
    r1: usize,
    p0: usize,
) -> (Vec<f64>, Vec<f64>) {
    let w = center.len();
    let (mut t1, mut t2) = (vec![0.0f64; w], vec![0.0f64; w]);
    let (mut s1, mut s2) = (vec![0.0f32; w], vec![0.0f32; w]);
    for (b0, b1) in row_blocks(r0, r1, 2 * w) {
        s1.fill(0.0);
        s2.fill(0.0);
        let span = |r: usize| r * cols + p0..r * cols + p0 + w;
        for (r, step) in row_groups(b0, b1) {
            if let Some(q) = step {
                let xs = std::array::from_fn(|k| &x[span(r + k * q)]);
                let gs = std::array::from_fn(|k| &dy[span(r + k * q)]);
                add_rows_grad::<ROWS>(&mut s1, &mut s2, center, xs, gs);
            } else {
                add_rows_grad::<1>(&mut s1, &mut s2, center, [&x[span(r)]], [&dy[span(r)]]);
            }
        }
        for j in 0..w {
            t1[j] += f64::from(s1[j]);
            t2[j] += f64::from(s2[j]);
        }
    }
    (t1, t2)
}

/// The rows `r0..r1` as `(r, Some(q))` for the groups of [`ROWS`] rows
/// `r + k q` (`k < ROWS`), then `(r, None)` for each row left over.
///
/// A group takes its rows from [`ROWS`] quarters of the block, not side by
/// side: where rows are contiguous (channels-last, `(N, C)` in one column
/// block) each of the [`ROWS`] streams then runs through memory for a
/// quarter of the block, which the hardware prefetcher follows, instead of
/// for one row (1 KiB at 256 channels) before the group moves on.
fn row_groups(r0: usize, r1: usize) -> impl Iterator<Item = (usize, Option<usize>)> {
    let q = (r1 - r0) / ROWS;
    (r0..r0 + q)
        .map(move |r| (r, Some(q)))
        .chain((r0 + q * ROWS..r1).map(|r| (r, None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chan_merge_equals_one_pass_over_the_union() {
        let a: Vec<f32> = (0..37).map(|i| 300.0 + (i as f32 * 0.37).sin()).collect();
        let whole = piece_moments(&a);
        let split = piece_moments(&a[..10]).merge(piece_moments(&a[10..]));
        assert!(
            (whole.mean - split.mean).abs() < 1e-9,
            "{whole:?} {split:?}"
        );
        assert!(
            (whole.m2 - split.m2).abs() < 1e-6 * whole.m2,
            "{whole:?} {split:?}"
        );
        let exact_mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / 37.0;
        let exact_m2: f64 = a.iter().map(|&v| (f64::from(v) - exact_mean).powi(2)).sum();
        assert!(
            (whole.m2 - exact_m2).abs() < 1e-4 * exact_m2,
            "{} vs {exact_m2}",
            whole.m2
        );
    }

    /// Exact `(mean, M2)` of column `j` of a row-major `rows x cols` tensor.
    fn exact_column(x: &[f32], cols: usize, j: usize) -> (f64, f64) {
        let v: Vec<f64> = x.iter().skip(j).step_by(cols).map(|&a| a.into()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (mean, v.iter().map(|a| (a - mean).powi(2)).sum())
    }

    #[test]
    fn row_blocks_keep_the_moments_exact_with_or_without_drift() {
        // 3000 rows of 4 columns: blocks of 1024 rows, so the second and
        // third block take the one-pass path, or fall back to two passes
        // where the rows drift by many standard deviations per block.
        let (rows, cols) = (3000, 4);
        for drift in [0.0f32, 0.02] {
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let (r, j) = (i / cols, i % cols);
                    300.0 + drift * r as f32 + ((i as f32) * 0.7).sin() * (1.0 + j as f32)
                })
                .collect();
            let (n, mean, m2) = row_task_moments(&x, cols, 0, rows, 0, cols);
            assert_eq!(n, rows as f64);
            for j in 0..cols {
                let (em, eq) = exact_column(&x, cols, j);
                assert!(
                    (mean[j] - em).abs() < 1e-8 * em.abs(),
                    "{drift} {j}: {} vs {em}",
                    mean[j]
                );
                assert!(
                    (m2[j] - eq).abs() < 1e-6 * eq,
                    "{drift} {j}: {} vs {eq}",
                    m2[j]
                );
            }
        }
    }

    #[test]
    fn constant_piece_has_zero_variance() {
        let a = vec![0.1f32; 1000];
        let m = piece_moments(&a);
        assert_eq!(m.mean as f32, 0.1);
        assert!(m.m2 >= 0.0 && m.m2 < 1e-12, "{m:?}");
    }
}

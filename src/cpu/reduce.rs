//! The reductions of the fast CPU backend: per-channel moments of `x`
//! (training statistics) and per-channel sums of `dy` and `dy * (x - mean)`
//! (backward), for every walk plan.
//!
//! Each piece of at most [`PIECE`] elements is reduced by the corrected
//! two-pass algorithm while it sits in cache, in `f32` lanes, and pieces and
//! tasks merge in `f64` (Chan's formula for moments), in a fixed order.

use super::lanes::{Lanes, add_centered, add_grad, add_row_centered, add_row_grad, add_sum};
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

/// Moments of every column `p0..p1` over rows `r0..r1`: two passes per
/// cache-sized block of rows in `f32`, blocks merged in `f64`.
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
        bm.fill(0.0);
        for r in b0..b1 {
            let row = &x[r * cols + p0..r * cols + p1];
            for (a, &v) in bm.iter_mut().zip(row) {
                *a += v;
            }
        }
        let inv = 1.0 / (b1 - b0) as f32;
        bm.iter_mut().for_each(|a| *a *= inv);
        s1.fill(0.0);
        s2.fill(0.0);
        for r in b0..b1 {
            let row = &x[r * cols + p0..r * cols + p1];
            add_row_centered(&mut s1, &mut s2, &bm, row);
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
        for r in b0..b1 {
            let span = r * cols + p0..r * cols + p0 + w;
            add_row_grad(&mut s1, &mut s2, center, &x[span.clone()], &dy[span]);
        }
        for j in 0..w {
            t1[j] += f64::from(s1[j]);
            t2[j] += f64::from(s2[j]);
        }
    }
    (t1, t2)
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

    #[test]
    fn constant_piece_has_zero_variance() {
        let a = vec![0.1f32; 1000];
        let m = piece_moments(&a);
        assert_eq!(m.mean as f32, 0.1);
        assert!(m.m2 >= 0.0 && m.m2 < 1e-12, "{m:?}");
    }
}

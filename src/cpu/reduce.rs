//! The reductions of the fast CPU backend: per-channel moments of `x`
//! (training statistics) and per-channel sums of `dy` and `dy * (x - mean)`
//! (backward; `dy` gated and written out on the way for a fused backward,
//! [`GradIn`]), for every walk plan.
//!
//! Each piece of at most [`PIECE`] elements is reduced by the corrected
//! two-pass algorithm while it sits in cache, in `f32` lanes, and pieces and
//! tasks merge in `f64` (Chan's formula for moments), in a fixed order.

use super::elem::CpuElement;
use super::grad::GradIn;
use super::lanes::{Lanes, SAMPLE, add_centered, add_sum, fits_one_pass, prefix_mean};
use super::plan::{PIECE, Plan, ROW_COLS, for_each_group, part_range, plan};
use super::rows::{block_moments, row_task_grad_sums, row_task_moments};
use crate::shape::ChannelWalk;
use crate::stats::Moments;
use rayon::prelude::*;

/// Moments of a cache-resident group of contiguous pieces `(start, len)` of
/// `x`, from `sum(x - m)` and `sum((x - m)^2)`: one pass around a shift (the
/// running mean of the groups before, or the mean of the group's first
/// [`SAMPLE`] values) that stands where [`fits_one_pass`]; else the
/// corrected two-pass algorithm, a first pass for the group's mean `m`.
#[inline]
pub(super) fn group_moments<E: CpuElement>(
    x: &[E],
    pieces: &[(usize, usize)],
    shift: Option<f32>,
) -> Moments {
    let count: usize = pieces.iter().map(|p| p.1).sum();
    let n = count as f64;
    let centered = |m: f32| {
        let (mut s1, mut s2) = (Lanes::new(), Lanes::new());
        for &(s, len) in pieces {
            add_centered(&mut s1, &mut s2, &x[s..s + len], m);
        }
        (s1.total(), s2.total())
    };
    let k = shift.unwrap_or_else(|| {
        let (s, len) = pieces[0];
        prefix_mean(&x[s..s + len.min(SAMPLE)])
    });
    let (m, (s1, s2)) = match centered(k) {
        (s1, s2) if fits_one_pass(s1, s2, n) => (k, (s1, s2)),
        _ => {
            let mut sum = Lanes::new();
            for &(s, len) in pieces {
                add_sum(&mut sum, &x[s..s + len]);
            }
            let m = (sum.total() / n) as f32;
            (m, centered(m))
        }
    };
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
    group_moments(x, &[(0, x.len())], None)
}

/// Per-channel moments of `x`.
pub(super) fn channel_moments<E: CpuElement>(x: &[E], walk: &ChannelWalk) -> Vec<Moments> {
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
                        let shift = (acc.n > 0.0).then_some(acc.mean as f32);
                        acc = acc.merge(group_moments(x, g, shift));
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

/// Per-channel `(sum(dy), sum(dy * (x - center32[c])))`, the spans of `dy`
/// taken from `grad` (each once: gated and written out where it gates).
pub(super) fn channel_grad_sums<E: CpuElement>(
    x: &[E],
    grad: &GradIn<'_, E>,
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
                            // SAFETY: the parts of the tasks tile each channel
                            // once (`for_each_group`), so no span is asked twice.
                            let x = &x[s..s + len];
                            unsafe { grad.add_sums((&mut s1, &mut s2), x, s, center32[c]) };
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
                            let l = &mut lanes[j];
                            // SAFETY: the tasks' channel blocks and ranges of
                            // runs tile the tensor, each run visited once.
                            let x = &x[start..start + walk.inner];
                            unsafe { grad.add_sums((&mut l.0, &mut l.1), x, start, center32[ch]) };
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
                    row_task_grad_sums(x, grad, cols, &center_col[p0..p1], r0, r1, p0)
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

/// Per-channel moments of `x`, with PyTorch's statistics for channels
/// holding `±inf` or NaN.
pub(super) fn local_moments<E: CpuElement>(x: &[E], walk: &ChannelWalk) -> Vec<Moments> {
    let mut moments = channel_moments(x, walk);
    non_finite_moments(x, walk, &mut moments);
    moments
}

/// Per-channel `(sum(dy), sum(dy * (x - center)))` of the gradient `grad`
/// hands out, taken around the `f32` centre and moved to the exact one.
pub(super) fn grad_sums<E: CpuElement>(
    x: &[E],
    grad: &GradIn<'_, E>,
    walk: &ChannelWalk,
    center: &[f64],
) -> Vec<(f64, f64)> {
    let center32: Vec<f32> = center.iter().map(|&v| v as f32).collect();
    let mut sums = channel_grad_sums(x, grad, walk, &center32);
    for ((s1, s2), (&c32, &c)) in sums.iter_mut().zip(center32.iter().zip(center)) {
        *s2 += (f64::from(c32) - c) * *s1;
    }
    sums
}

/// Channels whose mean came out infinite or NaN held `±inf` or NaN, which the
/// centred sums of the fast passes meet as `inf - inf`. Their statistics
/// become PyTorch's, those of a plain sum: the mean is `+inf` or `-inf` when
/// one kind of infinity sits among finite values, else NaN; `M2` is NaN.
fn non_finite_moments<E: CpuElement>(x: &[E], walk: &ChannelWalk, moments: &mut [Moments]) {
    for (c, m) in moments.iter_mut().enumerate() {
        non_finite_channel(x, walk, c, m);
    }
}

/// [`non_finite_moments`] of channel `c`, whose moments are `m`.
pub(super) fn non_finite_channel<E: CpuElement>(
    x: &[E],
    walk: &ChannelWalk,
    c: usize,
    m: &mut Moments,
) {
    if m.mean.is_finite() {
        return;
    }
    let sum: f64 = (0..walk.per_channel())
        .map(|i| f64::from(x[walk.index(c, i)].load()))
        .sum();
    m.mean = sum / m.n;
    m.m2 = f64::NAN;
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
    fn channel_and_block_walks_stay_exact_on_drifting_channels() {
        use crate::layout::Layout;
        // Channel values that drift by many standard deviations from piece to
        // piece (and slab to slab): the one pass around the running mean must
        // give way to two passes.
        for dims in [[3, 2, 20_000], [2000, 3, 49]] {
            let walk = ChannelWalk::new(&dims, Layout::ChannelsFirst).unwrap();
            let per = walk.per_channel();
            for drift in [0.0f32, 0.05] {
                let x: Vec<f32> = (0..walk.len())
                    .map(|i| {
                        let (o, k) = (i / (walk.channels * walk.inner), i % walk.inner);
                        let m = (o * walk.inner + k) as f32;
                        300.0 + drift * m * 4096.0 / per as f32 + (i as f32 * 0.7).sin()
                    })
                    .collect();
                let got = channel_moments(&x, &walk);
                for (c, g) in got.iter().enumerate() {
                    let v: Vec<f64> = (0..walk.len())
                        .filter(|i| (i / walk.inner) % walk.channels == c)
                        .map(|i| x[i].into())
                        .collect();
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    let m2: f64 = v.iter().map(|a| (a - mean).powi(2)).sum();
                    assert!(
                        (g.mean - mean).abs() < 1e-8 * mean,
                        "{dims:?} {drift} {c}: {g:?} vs {mean}"
                    );
                    assert!(
                        (g.m2 - m2).abs() < 1e-6 * m2,
                        "{dims:?} {drift} {c}: {g:?} vs {m2}"
                    );
                }
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

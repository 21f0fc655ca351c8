//! The row walk's reductions (channels-last, `(N, C)` and short spatial
//! sizes): per-column moments of `x` and per-column sums of `dy` and
//! `dy * (x - centre)` over a task's rows, accumulated per position in `f32`
//! within a cache-sized block of rows and in `f64` across blocks.

use super::elem::CpuElement;
use super::grad::GradIn;
use super::lanes::{
    ROWS, SAMPLE, add_rows, add_rows_centered, add_rows_grad, fits_one_pass, prefix_mean,
};
use super::plan::row_blocks;
use crate::shape::ChannelWalk;
use crate::stats::Moments;

/// Rows whose means centre the first block of a task.
const SAMPLE_ROWS: usize = 16;

/// Moments of every column `p0..p1` over rows `r0..r1`: per cache-sized
/// block of rows, sums of `x - m` and `(x - m)^2` in `f32` around the running
/// means (one pass, checked) or the block means (two passes); blocks merged
/// in `f64`.
pub(super) fn row_task_moments<E: CpuElement>(
    x: &[E],
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
                    add_rows_centered::<_, ROWS>(s1, s2, m, rows);
                } else {
                    add_rows_centered::<_, 1>(s1, s2, m, [row(r)]);
                }
            }
        };
        // One pass centred on the running column means (in the first block:
        // the means of its first SAMPLE_ROWS rows); it stands where every
        // block mean lies within one block standard deviation of them
        // (`s1^2/nb <= s2/2`, so `s2 - s1^2/nb` loses at most one bit), else
        // the block gets two passes.
        if n > 0.0 {
            for (b, &mu) in bm.iter_mut().zip(&mean) {
                *b = mu as f32;
            }
        } else {
            let first = (b1 - b0).min(SAMPLE_ROWS);
            bm.fill(0.0);
            for r in b0..b0 + first {
                add_rows::<_, 1>(&mut bm, [row(r)]);
            }
            let inv = 1.0 / first as f32;
            bm.iter_mut().for_each(|a| *a *= inv);
        }
        centered(&mut s1, &mut s2, &bm);
        let one_pass = s1
            .iter()
            .zip(&s2)
            .all(|(&d1, &d2)| fits_one_pass(d1.into(), d2.into(), nb));
        if !one_pass {
            bm.fill(0.0);
            for (r, step) in row_groups(b0, b1) {
                if let Some(q) = step {
                    add_rows::<_, ROWS>(&mut bm, std::array::from_fn(|k| row(r + k * q)));
                } else {
                    add_rows::<_, 1>(&mut bm, [row(r)]);
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

/// Moments of channels `c0..c1` over runs `r0..r1` (a block-walk task):
/// the block's runs of one `o` lie side by side, so it is walked as rows of
/// per-position sums, every position of a channel centred on the same
/// shift, and the positions of a channel summed in `f64` per block of rows.
/// One pass around the running means (first block: the mean of each
/// channel's first run) where every channel [`fits_one_pass`], else the
/// corrected two-pass algorithm; blocks merged in `f64`.
pub(super) fn block_moments<E: CpuElement>(
    x: &[E],
    walk: &ChannelWalk,
    (c0, c1): (usize, usize),
    (r0, r1): (usize, usize),
) -> Vec<Moments> {
    let (inner, nb) = (walk.inner, c1 - c0);
    let (cols, p0, w) = (walk.channels * inner, c0 * inner, nb * inner);
    let row = |o: usize| &x[o * cols + p0..o * cols + p0 + w];
    let mut acc = vec![Moments::default(); nb];
    let mut means = vec![0.0f32; nb];
    let (mut ctr, mut s1, mut s2) = (vec![0.0f32; w], vec![0.0f32; w], vec![0.0f32; w]);
    let by_channel = |v: &[f32]| -> Vec<f64> {
        v.chunks(inner)
            .map(|p| p.iter().map(|&a| f64::from(a)).sum())
            .collect()
    };
    for (b0, b1) in row_blocks(r0, r1, w) {
        let n = ((b1 - b0) * inner) as f64;
        let centered = |ctr: &mut [f32], s1: &mut [f32], s2: &mut [f32], means: &[f32]| {
            for (p, m) in ctr.chunks_mut(inner).zip(means) {
                p.fill(*m);
            }
            s1.fill(0.0);
            s2.fill(0.0);
            for (r, step) in row_groups(b0, b1) {
                if let Some(q) = step {
                    let rows = std::array::from_fn(|k| row(r + k * q));
                    add_rows_centered::<_, ROWS>(s1, s2, ctr, rows);
                } else {
                    add_rows_centered::<_, 1>(s1, s2, ctr, [row(r)]);
                }
            }
            (by_channel(s1), by_channel(s2))
        };
        for (j, (m, a)) in means.iter_mut().zip(&acc).enumerate() {
            *m = if a.n > 0.0 {
                a.mean as f32
            } else {
                prefix_mean(&row(b0)[j * inner..j * inner + inner.min(SAMPLE)])
            };
        }
        let (mut t1, mut t2) = centered(&mut ctr, &mut s1, &mut s2, &means);
        if !(0..nb).all(|j| fits_one_pass(t1[j], t2[j], n)) {
            s1.fill(0.0);
            for r in b0..b1 {
                add_rows::<_, 1>(&mut s1, [row(r)]);
            }
            for (m, t) in means.iter_mut().zip(by_channel(&s1)) {
                *m = (t / n) as f32;
            }
            (t1, t2) = centered(&mut ctr, &mut s1, &mut s2, &means);
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let m2 = t2[j] - t1[j] * t1[j] / n;
            *a = a.merge(Moments {
                n,
                mean: f64::from(means[j]) + t1[j] / n,
                m2: if m2 < 0.0 { 0.0 } else { m2 },
            });
        }
    }
    acc
}

/// Column sums of `dy` and `dy * (x - center)` over rows `r0..r1`, columns
/// `p0..p0 + center.len()`: `f32` within a block of rows, `f64` across
/// blocks; each row's span of `dy` taken from `grad` once.
pub(super) fn row_task_grad_sums<E: CpuElement>(
    x: &[E],
    grad: &GradIn<'_, E>,
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
        // The block's rows of the gradient: in one span where they lie side
        // by side (one column block: a fused backward gates them in one
        // sweep, then sums them from cache), else a span per row.
        // SAFETY: the tasks' row ranges and column blocks tile the tensor,
        // and the block's rows are asked once: as one span, or each row by
        // itself (`row_groups` visits each row of the block once).
        let whole = (w == cols).then(|| unsafe { grad.span(b0 * cols, (b1 - b0) * cols) });
        let dy = |r: usize| match whole {
            Some(block) => &block[(r - b0) * cols..(r - b0 + 1) * cols],
            None => unsafe { grad.span(r * cols + p0, w) },
        };
        for (r, step) in row_groups(b0, b1) {
            if let Some(q) = step {
                let xs = std::array::from_fn(|k| &x[span(r + k * q)]);
                let gs = std::array::from_fn(|k| dy(r + k * q));
                add_rows_grad::<_, ROWS>(&mut s1, &mut s2, center, xs, gs);
            } else {
                add_rows_grad::<_, 1>(&mut s1, &mut s2, center, [&x[span(r)]], [dy(r)]);
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
}

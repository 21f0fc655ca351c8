//! `f32` elementwise loops that take many segments per call: the row
//! walk's normalize four rows per load of the per-position coefficients,
//! and short runs (the block walk's spatial sizes, 7x7 to 31x31) with their
//! channel's coefficients looked up in the loop instead of a call of
//! [`super::elementwise::for_each_segment`]'s closure per run.
//!
//! Measured on 2 cores of an AMD EPYC, in one process, call by call
//! against the per-segment passes: training forward 1.05-1.14x at
//! 32x2048x7x7 channels-last and 1.12-1.22x at `(4096, 1024)` (four
//! rows); backward 1.09-1.13x and training forward 1.06-1.09x at
//! 32x2048x7x7 channels-first (short runs). Four rows at a time for the
//! backward's `dx` (sixteen streams) was slower (0.75-0.91x).

use super::kernels::{Residual, dx_run, normalize_row, normalize_run};
use super::lanes::ROWS;
use super::plan::TASK;
use crate::shape::ChannelWalk;
use rayon::prelude::*;

/// Elements one task takes, as [`super::elementwise::for_each_segment`]'s tasks.
fn task_len(len: usize) -> usize {
    TASK.max(len.div_ceil(rayon::current_num_threads().max(1) * 4))
        .min(TASK * 4)
}

/// Calls `f(out_rows, rows)` over the rows of `cols` elements of `out`,
/// `rows` their indices: in parallel over tasks of whole rows, each walked
/// [`ROWS`] rows at a time, one from each quarter of the task's rows (long
/// streams, as in the row walk's reductions), then row by row for the rest.
/// The per-position coefficients of a row walk's pass are then loaded once
/// for [`ROWS`] rows: a row of 2048 channels' three coefficients (24 KiB)
/// does not stay in L1 beside the rows.
fn for_row_groups(out: &mut [f32], cols: usize, f: impl Fn(&mut [&mut [f32]], &[usize]) + Sync) {
    let chunk = task_len(out.len());
    let task_rows = (chunk / cols).max(1);
    out.par_chunks_mut(task_rows * cols)
        .enumerate()
        .for_each(|(t, o)| {
            let r0 = t * task_rows;
            let q = o.len() / cols / ROWS;
            let (quarters, rest) = o.split_at_mut(ROWS * q * cols);
            if q > 0 {
                let mut qs = quarters.chunks_mut(q * cols);
                let mut quarter = || qs.next().expect("four quarters");
                let [o0, o1, o2, o3] = [quarter(), quarter(), quarter(), quarter()];
                for r in 0..q {
                    let span = r * cols..(r + 1) * cols;
                    let mut ys = [
                        &mut o0[span.clone()],
                        &mut o1[span.clone()],
                        &mut o2[span.clone()],
                        &mut o3[span],
                    ];
                    f(
                        &mut ys,
                        &std::array::from_fn::<_, ROWS, _>(|i| r0 + i * q + r),
                    );
                }
            }
            for (i, yr) in rest.chunks_mut(cols).enumerate() {
                f(&mut [yr], &[r0 + ROWS * q + i]);
            }
        });
}

/// `y = act((x - c) * s + b + z)` over `f32` rows of `k`'s length
/// (per-position coefficients `k = [c, s, b]`), `z(range)` the residual of
/// a range of elements, [`ROWS`] rows at a time ([`for_row_groups`]).
pub(super) fn normalize_rows<Z: Residual>(
    x: &[f32],
    z: impl Fn(std::ops::Range<usize>) -> Z + Sync,
    y: &mut [f32],
    k: [&[f32]; 3],
    act: impl Fn(f32) -> f32 + Copy + Sync,
) {
    let cols = k[0].len();
    let row = |r: usize| r * cols..(r + 1) * cols;
    for_row_groups(y, cols, |ys, rows| match (ys, rows) {
        ([y0, y1, y2, y3], &[a, b, c, d]) => {
            let xs = [a, b, c, d].map(|r| &x[row(r)]);
            let zs = [a, b, c, d].map(|r| z(row(r)));
            normalize_rows4([y0, y1, y2, y3], xs, zs, k, act);
        }
        (ys, rows) => {
            for (y, &r) in ys.iter_mut().zip(rows) {
                normalize_row(y, &x[row(r)], z(row(r)), k, act);
            }
        }
    });
}

/// [`normalize_row`] of [`ROWS`] rows at once: per position, the
/// coefficients loaded once.
#[inline(never)]
#[allow(clippy::needless_range_loop)]
fn normalize_rows4<Z: Residual>(
    [y0, y1, y2, y3]: [&mut [f32]; ROWS],
    x: [&[f32]; ROWS],
    z: [Z; ROWS],
    [c, s, b]: [&[f32]; 3],
    act: impl Fn(f32) -> f32,
) {
    let n = y0.len();
    let (y1, y2, y3) = (&mut y1[..n], &mut y2[..n], &mut y3[..n]);
    let (c, s, b) = (&c[..n], &s[..n], &b[..n]);
    let x = x.map(|r| &r[..n]);
    let z = z.map(|r| r.cut(n));
    for j in 0..n {
        let (cj, sj, bj) = (c[j], s[j], b[j]);
        y0[j] = act(z[0].add((x[0][j] - cj) * sj + bj, j));
        y1[j] = act(z[1].add((x[1][j] - cj) * sj + bj, j));
        y2[j] = act(z[2].add((x[2][j] - cj) * sj + bj, j));
        y3[j] = act(z[3].add((x[3][j] - cj) * sj + bj, j));
    }
}

/// `y = act((x - c) * s + b + z)` of `f32` tensors with short runs (the
/// block walk's spatial sizes), per-channel `k = [c, s, b]`, `z(range)` the
/// residual of a range of elements: as [`backward_dx_runs`].
pub(super) fn normalize_runs<Z: Residual>(
    x: &[f32],
    z: impl Fn(std::ops::Range<usize>) -> Z + Sync,
    y: &mut [f32],
    walk: &ChannelWalk,
    k: [&[f32]; 3],
    act: impl Fn(f32) -> f32 + Copy + Sync,
) {
    let inner = walk.inner;
    let chunk = task_len(y.len());
    let task_runs = (chunk / inner).max(1);
    y.par_chunks_mut(task_runs * inner)
        .enumerate()
        .for_each(|(t, o)| {
            let run0 = t * task_runs;
            let mut c = run0 % walk.channels;
            for (i, d) in o.chunks_exact_mut(inner).enumerate() {
                let s = (run0 + i) * inner..(run0 + i + 1) * inner;
                let kc = [k[0][c], k[1][c], k[2][c]];
                normalize_run(d, &x[s.clone()], z(s), kc, act);
                c = if c + 1 == walk.channels { 0 } else { c + 1 };
            }
        });
}

/// `dx = a dy + b (x - m) + c` of `f32` tensors with short runs (the block
/// walk's spatial sizes), per-channel coefficients `k = [m, a, b, c]`: in
/// parallel over tasks of whole runs, each run's coefficients looked up in
/// the loop (a call per 49-element run, as [`super::elementwise::for_each_segment`] makes,
/// cost as much as the run's traffic).
pub(super) fn backward_dx_runs(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    walk: &ChannelWalk,
    k: [&[f32]; 4],
) {
    let inner = walk.inner;
    let chunk = task_len(dx.len());
    let task_runs = (chunk / inner).max(1);
    dx.par_chunks_mut(task_runs * inner)
        .enumerate()
        .for_each(|(t, o)| {
            let run0 = t * task_runs;
            let mut c = run0 % walk.channels;
            for (i, d) in o.chunks_exact_mut(inner).enumerate() {
                let s = (run0 + i) * inner;
                let kc = [k[0][c], k[1][c], k[2][c], k[3][c]];
                dx_run(d, &x[s..s + inner], &dy[s..s + inner], kc);
                c = if c + 1 == walk.channels { 0 } else { c + 1 };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::Activation;

    #[test]
    fn row_groups_visit_every_row_once_with_its_index() {
        for (rows, cols) in [(0, 3), (1, 3), (5, 3), (9, 3), (50, 10_000), (7, 70_000)] {
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                let mut out = vec![-1.0f32; rows * cols];
                pool.unwrap().install(|| {
                    for_row_groups(&mut out, cols, |ys, idx| {
                        assert!(ys.len() == ROWS || ys.len() == 1);
                        for (y, &r) in ys.iter_mut().zip(idx) {
                            assert_eq!(y.len(), cols);
                            y.iter_mut().for_each(|v| *v += 1.0 + r as f32);
                        }
                    });
                });
                for (r, row) in out.chunks(cols.max(1)).enumerate() {
                    assert!(row.iter().all(|&v| v == r as f32), "{rows}x{cols}: row {r}");
                }
            }
        }
    }

    #[test]
    fn short_runs_get_their_channels_coefficients() {
        use crate::layout::Layout;
        for (dims, threads) in [([3, 5, 7, 7], 1), ([40, 70, 7, 7], 3), ([2, 3, 20, 30], 2)] {
            let walk = ChannelWalk::new(&dims, Layout::ChannelsFirst).unwrap();
            let n = walk.len();
            let val = |i: usize, f: f32| ((i as f32) * f).sin() * 2.0;
            let (x, z): (Vec<f32>, Vec<f32>) = (0..n).map(|i| (val(i, 0.37), val(i, 0.11))).unzip();
            let k: [Vec<f32>; 4] = std::array::from_fn(|q| {
                (0..walk.channels)
                    .map(|c| {
                        if q == 2 && c == 1 {
                            0.0
                        } else {
                            val(c, 0.5 + q as f32)
                        }
                    })
                    .collect()
            });
            let kk = [&k[0][..], &k[1][..], &k[2][..], &k[3][..]];
            let ch = |i: usize| i / walk.inner % walk.channels;
            let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let relu = |v| Activation::Relu.apply(v);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                normalize_runs(&x, |r| &z[r], &mut y, &walk, [kk[0], kk[1], kk[2]], relu);
                backward_dx_runs(&x, &z, &mut dx, &walk, kk);
            });
            for i in 0..n {
                let c = ch(i);
                let want = relu((x[i] - k[0][c]) * k[1][c] + k[2][c] + z[i]);
                assert_eq!(y[i], want, "{dims:?} y {i}");
                let t = if k[2][c] == 0.0 {
                    0.0
                } else {
                    k[2][c] * (x[i] - k[0][c])
                };
                assert_eq!(dx[i], k[1][c] * z[i] + t + k[3][c], "{dims:?} dx {i}");
            }
        }
    }

    #[test]
    fn rows_at_once_are_the_rows_one_by_one() {
        let (rows, cols) = (13, 37);
        let val = |i: usize, f: f32| ((i as f32) * f).sin() * 2.0;
        let x: Vec<f32> = (0..rows * cols).map(|i| val(i, 0.37)).collect();
        let z: Vec<f32> = (0..rows * cols).map(|i| val(i, 0.11)).collect();
        let k: [Vec<f32>; 3] =
            std::array::from_fn(|q| (0..cols).map(|j| val(j, 0.5 + q as f32)).collect());
        let k = [&k[0][..], &k[1][..], &k[2][..]];
        let relu = |v| Activation::Relu.apply(v);
        let mut got = vec![f32::NAN; rows * cols];
        normalize_rows(&x, |r| &z[r], &mut got, k, relu);
        let mut want = vec![f32::NAN; rows * cols];
        for (r, y) in want.chunks_mut(cols).enumerate() {
            let span = r * cols..(r + 1) * cols;
            normalize_row(y, &x[span.clone()], &z[span], k, relu);
        }
        assert_eq!(got, want);
        normalize_rows(&x, |_| (), &mut got, k, |v| v);
        for (r, y) in want.chunks_mut(cols).enumerate() {
            normalize_row(y, &x[r * cols..(r + 1) * cols], (), k, |v| v);
        }
        assert_eq!(got, want);
    }
}

//! A fast BatchNorm on the CPU, in `f32`, on every core.
//!
//! [`CpuBatchNorm`] has the semantics of [`crate::CpuReference`] (PyTorch's) but
//! is built for speed rather than as an oracle:
//!
//! - rayon tasks over channels, and over slices of a channel when the
//!   channels are few and large; the partial statistics of the slices merge
//!   with Chan's formula in a fixed order, so a run is reproducible for a
//!   given number of threads;
//! - inner loops over contiguous runs with 16 independent `f32` lanes, which
//!   the compiler turns into SIMD code;
//! - channels-last tensors (and channels-first ones with a spatial size below
//!   16, such as `(N, C)`) are walked row by row: a row holds every channel
//!   side by side, and per-channel vectors are accumulated instead of
//!   striding through memory.
//!
//! Statistics never use `E[x^2] - E[x]^2`. Each piece of at most 4096
//! elements is reduced by the corrected two-pass algorithm while it sits in
//! the L1/L2 cache (a first pass for its mean `m`, then `sum(x - m)` and
//! `sum((x - m)^2)`), and pieces merge in `f64`:
//!
//! ```text
//! piece:  mean_p = m + s1/n,   M2_p = s2 - s1^2/n        (s1, s2 over x - m)
//! merge:  d = mean_b - mean_a, n = n_a + n_b
//!         mean = mean_a + d n_b/n,  M2 = M2_a + M2_b + d^2 n_a n_b/n
//! ```
//!
//! so a channel with mean 300 and unit variance loses no precision. The
//! slice-based methods ([`CpuBatchNorm::forward_train_slice`] and friends)
//! skip ndarray entirely, for benchmarks and for callers with their own
//! buffers.

use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, Mode};
use crate::error::{Error, Result};
use crate::reference::{check_same_shape, input_walk, uses_batch_stats};
use crate::shape::ChannelWalk;
use crate::state::{BatchNormState, Gradients, SavedStats};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

/// Independent accumulators of the inner loops (a multiple of every SIMD width).
const LANES: usize = 16;
/// Elements of one cache-resident two-pass piece.
const PIECE: usize = 4096;
/// Elements one rayon task takes at most in the reductions and elementwise passes.
const TASK: usize = 1 << 16;
/// Fewest elements worth a rayon task of their own.
const MIN_TASK: usize = 1 << 13;
/// Channels-first tensors with a spatial size below this are walked by rows.
const ROW_WALK_BELOW: usize = 16;
/// Runs shorter than this (but at least [`ROW_WALK_BELOW`]) are walked in
/// memory order, a block of channels at a time: one channel's runs lie
/// `C * inner` elements apart, too far for the prefetcher when runs are short.
const BLOCK_WALK_BELOW: usize = 1024;
/// Positions (columns) one row-walk task accumulates at most.
const ROW_COLS: usize = 4096;
/// Bytes of rows one row-walk sub-block holds (two passes over it stay in cache).
const ROW_BLOCK_BYTES: usize = 128 * 1024;

/// Count, mean and sum of squared deviations of some values, in `f64`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// Chan's parallel merge.
    fn merge(self, other: Moments) -> Moments {
        if other.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return other;
        }
        let n = self.n + other.n;
        let d = other.mean - self.mean;
        Moments {
            n,
            mean: self.mean + d * (other.n / n),
            m2: self.m2 + other.m2 + d * d * (self.n * other.n / n),
        }
    }

    /// Biased variance `M2 / n`.
    fn var(self) -> f64 {
        self.m2 / self.n
    }
}

/// [`LANES`] independent `f32` accumulators (the compiler keeps them in SIMD
/// registers) and an `f64` tail for the elements past the last full chunk.
///
/// The functions that add to them are `#[inline(never)]`: on their own they
/// compile to packed SIMD (`subps`, `mulps`, `addps` on x86-64), while
/// inlined into the piece loops LLVM vectorized across chunks instead, with
/// strided scalar loads (twice slower on 7x7 runs).
#[derive(Debug, Clone, Copy)]
struct Lanes {
    v: [f32; LANES],
    tail: f64,
}

impl Lanes {
    fn new() -> Self {
        Self {
            v: [0.0; LANES],
            tail: 0.0,
        }
    }

    /// The sum of every lane and the tail, in `f64`.
    fn total(&self) -> f64 {
        self.v.iter().map(|&v| f64::from(v)).sum::<f64>() + self.tail
    }
}

/// `acc += sum(x)`.
#[inline(never)]
fn add_sum(acc: &mut Lanes, x: &[f32]) {
    let (chunks, rest) = x.as_chunks::<LANES>();
    // Lanes in a local array and whole-array updates: SIMD adds, no reloads.
    let mut a = acc.v;
    for c in chunks {
        a = std::array::from_fn(|l| a[l] + c[l]);
    }
    acc.v = a;
    acc.tail += rest.iter().map(|&v| f64::from(v)).sum::<f64>();
}

/// `s1 += sum(x - m)`, `s2 += sum((x - m)^2)`.
#[inline(never)]
fn add_centered(s1: &mut Lanes, s2: &mut Lanes, x: &[f32], m: f32) {
    let (chunks, rest) = x.as_chunks::<LANES>();
    let (mut a1, mut a2) = (s1.v, s2.v);
    for c in chunks {
        let d: [f32; LANES] = std::array::from_fn(|l| c[l] - m);
        a1 = std::array::from_fn(|l| a1[l] + d[l]);
        a2 = std::array::from_fn(|l| a2[l] + d[l] * d[l]);
    }
    (s1.v, s2.v) = (a1, a2);
    for &v in rest {
        let d = v - m;
        s1.tail += f64::from(d);
        s2.tail += f64::from(d * d);
    }
}

/// `s1 += sum(dy)`, `s2 += sum(dy * (x - center))`.
#[inline(never)]
fn add_grad(s1: &mut Lanes, s2: &mut Lanes, x: &[f32], dy: &[f32], center: f32) {
    let (xc, xr) = x.as_chunks::<LANES>();
    let (gc, gr) = dy.as_chunks::<LANES>();
    let (mut a1, mut a2) = (s1.v, s2.v);
    for (a, g) in xc.iter().zip(gc) {
        let d: [f32; LANES] = std::array::from_fn(|l| a[l] - center);
        a1 = std::array::from_fn(|l| a1[l] + g[l]);
        a2 = std::array::from_fn(|l| a2[l] + g[l] * d[l]);
    }
    (s1.v, s2.v) = (a1, a2);
    for (&a, &g) in xr.iter().zip(gr) {
        s1.tail += f64::from(g);
        s2.tail += f64::from(g * (a - center));
    }
}

/// Moments of a cache-resident group of contiguous pieces `(start, len)` of
/// `x`, by the corrected two-pass algorithm: a first pass for the mean `m`,
/// then `sum(x - m)` and `sum((x - m)^2)`.
#[inline]
fn group_moments(x: &[f32], pieces: &[(usize, usize)]) -> Moments {
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
fn piece_moments(x: &[f32]) -> Moments {
    group_moments(x, &[(0, x.len())])
}

/// How a tensor is cut into rayon tasks.
#[derive(Debug, Clone, Copy)]
enum Plan {
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

fn plan(walk: &ChannelWalk) -> Plan {
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
fn part_range(n: usize, parts: usize, k: usize) -> (usize, usize) {
    (k * n / parts, (k + 1) * n / parts)
}

/// Calls `f(flat_start, len)` for each contiguous piece of elements
/// `m0..m1` of channel `c`, pieces no longer than [`PIECE`].
#[inline]
fn for_each_piece(
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
fn for_each_group(
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
fn row_blocks(r0: usize, r1: usize, width: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = (ROW_BLOCK_BYTES / 4 / width.max(1)).clamp(4, 1024);
    (r0..r1).step_by(step).map(move |r| (r, (r + step).min(r1)))
}

/// Per-channel moments of `x`.
fn channel_moments(x: &[f32], walk: &ChannelWalk) -> Vec<Moments> {
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
fn block_moments(
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
fn row_task_moments(
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
fn channel_grad_sums(
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
fn row_task_grad_sums(
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

/// Per-channel coefficients of an elementwise pass, as `f32` arrays.
struct Coefs {
    /// One entry per channel, or per row position (`C * inner`) for a row walk.
    per_position: bool,
    k: [Vec<f32>; 4],
}

impl Coefs {
    /// Lays out per-channel coefficients for `walk`.
    fn new(walk: &ChannelWalk, k: [Vec<f32>; 4]) -> Coefs {
        if walk.inner < ROW_WALK_BELOW {
            let inner = walk.inner;
            let expand = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .flat_map(|&a| std::iter::repeat_n(a, inner))
                    .collect()
            };
            Coefs {
                per_position: true,
                k: [expand(&k[0]), expand(&k[1]), expand(&k[2]), expand(&k[3])],
            }
        } else {
            Coefs {
                per_position: false,
                k,
            }
        }
    }
}

/// Runs `f(start, len, coefficient slices or one value each)` over `out` in
/// parallel, one call per contiguous segment that shares its coefficients
/// (per-channel) or lies in one row (per-position).
fn for_each_segment(
    out: &mut [f32],
    walk: &ChannelWalk,
    coefs: &Coefs,
    f: impl Fn(&mut [f32], usize, Seg<'_>) + Sync,
) {
    let chunk = TASK
        .max(out.len().div_ceil(rayon::current_num_threads().max(1) * 4))
        .min(TASK * 4);
    out.par_chunks_mut(chunk).enumerate().for_each(|(t, o)| {
        let base = t * chunk;
        let mut i = 0;
        while i < o.len() {
            let g = base + i;
            if coefs.per_position {
                let cols = coefs.k[0].len();
                let p = g % cols;
                let n = (cols - p).min(o.len() - i);
                let k = &coefs.k;
                let seg = Seg::Slices([
                    &k[0][p..p + n],
                    &k[1][p..p + n],
                    &k[2][p..p + n],
                    &k[3][p..p + n],
                ]);
                f(&mut o[i..i + n], g, seg);
                i += n;
            } else {
                let run = g / walk.inner;
                let c = run % walk.channels;
                let n = ((run + 1) * walk.inner - g).min(o.len() - i);
                let k = &coefs.k;
                f(
                    &mut o[i..i + n],
                    g,
                    Seg::Scalar([k[0][c], k[1][c], k[2][c], k[3][c]]),
                );
                i += n;
            }
        }
    });
}

/// Coefficients of one segment.
enum Seg<'a> {
    Scalar([f32; 4]),
    Slices([&'a [f32]; 4]),
}

// The row loops below index slices cut to one length, the form LLVM
// vectorizes most reliably (long `zip` chains sometimes stay scalar).

/// `s1 += row - m`, `s2 += (row - m)^2`, per position.
#[inline]
#[allow(clippy::needless_range_loop)]
fn add_row_centered(s1: &mut [f32], s2: &mut [f32], m: &[f32], row: &[f32]) {
    let n = s1.len();
    let (s2, m, row) = (&mut s2[..n], &m[..n], &row[..n]);
    for j in 0..n {
        let d = row[j] - m[j];
        s1[j] += d;
        s2[j] += d * d;
    }
}

/// `s1 += dy`, `s2 += dy * (x - center)`, per position.
#[inline]
#[allow(clippy::needless_range_loop)]
fn add_row_grad(s1: &mut [f32], s2: &mut [f32], center: &[f32], x: &[f32], dy: &[f32]) {
    let n = s1.len();
    let (s2, center, x, dy) = (&mut s2[..n], &center[..n], &x[..n], &dy[..n]);
    for j in 0..n {
        s1[j] += dy[j];
        s2[j] += dy[j] * (x[j] - center[j]);
    }
}

/// `y = (x - c) * s + b`, per position.
#[inline]
#[allow(clippy::needless_range_loop)]
fn normalize_row(y: &mut [f32], x: &[f32], c: &[f32], s: &[f32], b: &[f32]) {
    let n = y.len();
    let (x, c, s, b) = (&x[..n], &c[..n], &s[..n], &b[..n]);
    for j in 0..n {
        y[j] = (x[j] - c[j]) * s[j] + b[j];
    }
}

/// `dx = a dy + b (x - m) + c` per position, coefficients `[m, a, b, c]`;
/// where `b = 0` (running statistics) `x` does not enter, so a NaN in `x`
/// stays out, as in PyTorch's evaluation backward.
#[inline]
#[allow(clippy::needless_range_loop)]
fn backward_dx_row(dx: &mut [f32], x: &[f32], dy: &[f32], [m, a, b, c]: [&[f32]; 4]) {
    let n = dx.len();
    let (x, dy, m, a, b, c) = (&x[..n], &dy[..n], &m[..n], &a[..n], &b[..n], &c[..n]);
    for j in 0..n {
        let xt = if b[j] == 0.0 {
            0.0
        } else {
            b[j] * (x[j] - m[j])
        };
        dx[j] = a[j] * dy[j] + xt + c[j];
    }
}

/// `y = (x - center) * scale + shift`, coefficients `[center, scale, shift, _]`.
fn normalize(x: &[f32], y: &mut [f32], walk: &ChannelWalk, coefs: &Coefs) {
    for_each_segment(y, walk, coefs, |y, start, seg| {
        let x = &x[start..start + y.len()];
        match seg {
            Seg::Scalar([c, s, b, _]) => {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = (v - c) * s + b;
                }
            }
            Seg::Slices([c, s, b, _]) => normalize_row(y, x, c, s, b),
        }
    });
}

/// `dx = a * dy + b * (x - center) + c`, coefficients `[center, a, b, c]`.
fn backward_dx(x: &[f32], dy: &[f32], dx: &mut [f32], walk: &ChannelWalk, coefs: &Coefs) {
    for_each_segment(dx, walk, coefs, |dx, start, seg| {
        let span = start..start + dx.len();
        let (x, dy) = (&x[span.clone()], &dy[span]);
        match seg {
            // b = 0 (running statistics): x does not enter dx, so a NaN in x
            // stays out, as in PyTorch's evaluation backward.
            Seg::Scalar([_, a, 0.0, c]) => {
                for (o, &g) in dx.iter_mut().zip(dy) {
                    *o = a * g + c;
                }
            }
            Seg::Scalar([m, a, b, c]) => {
                for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                    *o = a * g + b * (v - m) + c;
                }
            }
            Seg::Slices(k) => backward_dx_row(dx, x, dy, k),
        }
    });
}

/// Copies `src` into `dst` on every core: the CPU's bandwidth roofline for
/// `bnorm bench` (8 bytes of traffic per `f32` element).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn parallel_copy(src: &[f32], dst: &mut [f32]) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::ShapeMismatch {
            what: "copy destination".into(),
            expected: vec![src.len()],
            got: vec![dst.len()],
        });
    }
    let chunk = TASK
        .max(src.len().div_ceil(rayon::current_num_threads().max(1) * 4))
        .min(TASK * 4);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| {
            // `+ 0.0` keeps LLVM from calling memcpy, whose non-temporal stores
            // would send a cache-sized copy to DRAM while BatchNorm's passes,
            // with ordinary stores, stay in cache: a streaming loop like theirs.
            for (d, &s) in d.iter_mut().zip(s) {
                *d = s + 0.0;
            }
        });
    Ok(())
}

#[derive(Debug, Clone)]
struct Saved {
    dims: Vec<usize>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

/// BatchNorm on the CPU in `f32` with rayon: the fast CPU backend.
///
/// Same semantics and state as [`crate::CpuReference`] (PyTorch's), within the
/// `f32` tolerance of it; per-channel statistics are merged in `f64`. Runs on
/// rayon's global pool (`RAYON_NUM_THREADS` sets its size).
///
/// ```
/// use wgpu_batchnorm::{BatchNormConfig, CpuBatchNorm, Mode};
/// let mut bn = CpuBatchNorm::new(BatchNormConfig::new(2))?;
/// let dims = [2, 2, 3]; // (N, C, L)
/// let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
/// let mut y = vec![0.0; 12];
/// bn.forward_train_slice(&x, &dims, &mut y)?;
/// // channel 0 holds 0, 1, 2, 6, 7, 8: mean 4
/// assert!((bn.saved_stats().unwrap().mean[0] - 4.0).abs() < 1e-6);
/// let (mut dx, mut dw, mut db) = (vec![0.0; 12], vec![0.0; 2], vec![0.0; 2]);
/// bn.backward_slice(&x, &y, &dims, Mode::Train, &mut dx, &mut dw, &mut db)?;
/// assert!((db[0] - y[..3].iter().chain(&y[6..9]).sum::<f32>()).abs() < 1e-5);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CpuBatchNorm {
    config: BatchNormConfig,
    state: BatchNormState,
    saved: Option<Saved>,
}

/// Checks that a slice holds exactly the elements of `dims`.
fn check_len(what: &str, len: usize, walk: &ChannelWalk) -> Result<()> {
    if len != walk.len() {
        return Err(Error::ShapeMismatch {
            what: format!("{what} (a slice of {len} elements)"),
            expected: walk.dims.clone(),
            got: vec![len],
        });
    }
    Ok(())
}

impl CpuBatchNorm {
    /// A layer in PyTorch's initial state.
    ///
    /// # Errors
    /// [`Error::Config`] when the configuration is invalid.
    pub fn new(config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let state = BatchNormState::new(&config);
        Ok(Self {
            config,
            state,
            saved: None,
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Parameters and running statistics.
    pub fn state(&self) -> &BatchNormState {
        &self.state
    }

    /// Replaces parameters and running statistics.
    ///
    /// # Errors
    /// [`Error::ParameterLength`], [`Error::MissingParameter`].
    pub fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        state.validate(&self.config)?;
        self.state = state.clone();
        Ok(())
    }

    /// Batch statistics kept by the last forward that computed them.
    pub fn saved_stats(&self) -> Option<SavedStats> {
        self.saved.as_ref().map(|s| SavedStats {
            mean: s.mean.iter().map(|&v| v as f32).collect(),
            invstd: s.invstd.iter().map(|&v| v as f32).collect(),
        })
    }

    fn weight(&self, c: usize) -> f64 {
        self.state.weight.as_ref().map_or(1.0, |w| f64::from(w[c]))
    }

    fn bias(&self, c: usize) -> f64 {
        self.state.bias.as_ref().map_or(0.0, |b| f64::from(b[c]))
    }

    /// Normalizes with batch statistics; with `update`, moves the running ones.
    fn batch_forward(
        &mut self,
        x: &[f32],
        dims: &[usize],
        y: &mut [f32],
        update: bool,
    ) -> Result<()> {
        let walk = input_walk(&self.config, dims, true)?;
        check_len("x", x.len(), &walk)?;
        check_len("y", y.len(), &walk)?;
        let moments = channel_moments(x, &walk);
        let eps = self.config.eps;
        let invstd: Vec<f64> = moments
            .iter()
            .map(|m| 1.0 / (m.var() + eps).sqrt())
            .collect();
        let mean: Vec<f64> = moments.iter().map(|m| m.mean).collect();
        // y = (x - c32) * s + (b + (c32 - mean) * s): the rounding of the centre
        // to f32 is folded into the shift, so large means cost no precision.
        let c = walk.channels;
        let (mut k0, mut k1, mut k2) = (
            Vec::with_capacity(c),
            Vec::with_capacity(c),
            Vec::with_capacity(c),
        );
        for ch in 0..c {
            let c32 = mean[ch] as f32;
            let s = self.weight(ch) * invstd[ch];
            k0.push(c32);
            k1.push(s as f32);
            k2.push((self.bias(ch) + (f64::from(c32) - mean[ch]) * s) as f32);
        }
        normalize(x, y, &walk, &Coefs::new(&walk, [k0, k1, k2, vec![0.0; c]]));
        if update && self.config.track_running_stats {
            let nbt = self.state.num_batches_tracked.unwrap_or(0) + 1;
            let f = self.config.momentum_factor(nbt);
            let m = walk.per_channel() as f64;
            let rm = self.state.running_mean.as_mut().expect("tracked");
            let rv = self.state.running_var.as_mut().expect("tracked");
            for ch in 0..c {
                let var = moments[ch].var();
                rm[ch] = ((1.0 - f) * f64::from(rm[ch]) + f * mean[ch]) as f32;
                rv[ch] = ((1.0 - f) * f64::from(rv[ch]) + f * var * m / (m - 1.0)) as f32;
            }
            self.state.num_batches_tracked = Some(nbt);
        }
        self.saved = Some(Saved {
            dims: walk.dims,
            mean,
            invstd,
        });
        Ok(())
    }

    /// Training forward on a contiguous tensor of shape `dims` (in the layer's
    /// layout) into `y`: normalizes with batch statistics, keeps them for
    /// backward and updates the running statistics when tracked.
    ///
    /// ```text
    /// y = (x - mean) / sqrt(var + eps) * weight + bias      (var biased)
    /// running_mean = (1-m) running_mean + m mean
    /// running_var  = (1-m) running_var  + m var M/(M-1)
    /// ```
    ///
    /// # Errors
    /// [`Error::Rank`], [`Error::ChannelMismatch`], [`Error::Empty`],
    /// [`Error::TooLarge`], [`Error::SingleValuePerChannel`], and
    /// [`Error::ShapeMismatch`] when `x` or `y` does not hold `dims`' elements.
    /// On error the layer is unchanged and `y` unwritten.
    pub fn forward_train_slice(&mut self, x: &[f32], dims: &[usize], y: &mut [f32]) -> Result<()> {
        self.batch_forward(x, dims, y, true)
    }

    /// Evaluation forward into `y`: running statistics, or batch statistics
    /// (kept for backward; running statistics untouched) when they are not tracked.
    ///
    /// ```text
    /// y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
    /// ```
    ///
    /// # Errors
    /// As [`CpuBatchNorm::forward_train_slice`]; one value per channel is an
    /// error only without tracked statistics.
    pub fn forward_eval_slice(&mut self, x: &[f32], dims: &[usize], y: &mut [f32]) -> Result<()> {
        if !self.config.track_running_stats {
            return self.batch_forward(x, dims, y, false);
        }
        let walk = input_walk(&self.config, dims, false)?;
        check_len("x", x.len(), &walk)?;
        check_len("y", y.len(), &walk)?;
        let rm = self.state.running_mean.as_ref().expect("tracked");
        let rv = self.state.running_var.as_ref().expect("tracked");
        let c = walk.channels;
        let k1: Vec<f32> = (0..c)
            .map(|ch| (self.weight(ch) / (f64::from(rv[ch]) + self.config.eps).sqrt()) as f32)
            .collect();
        let k2: Vec<f32> = (0..c).map(|ch| self.bias(ch) as f32).collect();
        normalize(
            x,
            y,
            &walk,
            &Coefs::new(&walk, [rm.clone(), k1, k2, vec![0.0; c]]),
        );
        Ok(())
    }

    /// Backward of the forward in `mode` at input `x` with upstream gradient
    /// `dy`, into `dx` (shape `dims`), `dweight` and `dbias` (length `C`; written
    /// also without affine, as if `weight = 1`).
    ///
    /// ```text
    /// batch statistics (Mode::Train, or Mode::Eval without tracking):
    ///   dbias = sum(dy), dweight = sum(dy (x - mean)) invstd
    ///   dx = weight invstd (dy - sum(dy)/M - (x - mean) invstd^2 sum(dy (x - mean))/M)
    /// running statistics (Mode::Eval with tracking):
    ///   dx = dy weight / sqrt(running_var + eps)
    /// ```
    ///
    /// # Errors
    /// Shape errors as [`CpuBatchNorm::forward_train_slice`],
    /// [`Error::ShapeMismatch`] for a slice of the wrong length,
    /// [`Error::NoSavedStatistics`] when batch statistics of this shape were not
    /// computed by a forward first. On error nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_slice(
        &mut self,
        x: &[f32],
        dy: &[f32],
        dims: &[usize],
        mode: Mode,
        dx: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
    ) -> Result<()> {
        let walk = input_walk(&self.config, dims, false)?;
        check_len("x", x.len(), &walk)?;
        check_len("dy", dy.len(), &walk)?;
        check_len("dx", dx.len(), &walk)?;
        let c = walk.channels;
        for (what, v) in [("dweight", &*dweight), ("dbias", &*dbias)] {
            if v.len() != c {
                return Err(Error::ShapeMismatch {
                    what: what.into(),
                    expected: vec![c],
                    got: vec![v.len()],
                });
            }
        }
        let batch = uses_batch_stats(&self.config, mode);
        let (center, invstd): (Vec<f64>, Vec<f64>) = if batch {
            match &self.saved {
                Some(s) if s.dims == walk.dims => (s.mean.clone(), s.invstd.clone()),
                Some(s) => {
                    return Err(Error::NoSavedStatistics {
                        detail: format!(" (saved for shape {:?}, got {:?})", s.dims, walk.dims),
                    });
                }
                None => {
                    return Err(Error::NoSavedStatistics {
                        detail: String::new(),
                    });
                }
            }
        } else {
            let rm = self.state.running_mean.as_ref().expect("tracked");
            let rv = self.state.running_var.as_ref().expect("tracked");
            (
                rm.iter().map(|&v| f64::from(v)).collect(),
                rv.iter()
                    .map(|&v| 1.0 / (f64::from(v) + self.config.eps).sqrt())
                    .collect(),
            )
        };
        let center32: Vec<f32> = center.iter().map(|&v| v as f32).collect();
        let sums = channel_grad_sums(x, dy, &walk, &center32);
        let mf = walk.per_channel() as f64;
        let mut k = [
            vec![0.0f32; c],
            vec![0.0f32; c],
            vec![0.0f32; c],
            vec![0.0f32; c],
        ];
        for ch in 0..c {
            let (s1, s2_32) = sums[ch];
            // Sums were taken around the f32 centre; move them to the exact one.
            let s2 = s2_32 + (f64::from(center32[ch]) - center[ch]) * s1;
            let is = invstd[ch];
            let a = self.weight(ch) * is;
            dweight[ch] = (s2 * is) as f32;
            dbias[ch] = s1 as f32;
            let (b, cc) = if batch {
                (-a * is * is * s2 / mf, -a * s1 / mf)
            } else {
                (0.0, 0.0)
            };
            // dx = a dy + b (x - c32) + (c + b (c32 - centre))
            k[0][ch] = center32[ch];
            k[1][ch] = a as f32;
            k[2][ch] = b as f32;
            k[3][ch] = (cc + b * (f64::from(center32[ch]) - center[ch])) as f32;
        }
        backward_dx(x, dy, dx, &walk, &Coefs::new(&walk, k));
        Ok(())
    }
}

/// The shape of an ndarray input, owned.
fn dims_of(x: &ArrayViewD<'_, f32>) -> Vec<usize> {
    x.shape().to_vec()
}

impl BatchNormBackend for CpuBatchNorm {
    fn backend_name(&self) -> String {
        "cpu".into()
    }

    fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    fn forward_train(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let dims = dims_of(&x);
        let xs = x.as_standard_layout();
        let xs = xs.as_slice().expect("standard layout is contiguous");
        let mut y = vec![0.0f32; xs.len()];
        self.forward_train_slice(xs, &dims, &mut y)?;
        Ok(ArrayD::from_shape_vec(IxDyn(&dims), y).expect("shape of x"))
    }

    fn forward_eval(&mut self, x: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>> {
        let dims = dims_of(&x);
        let xs = x.as_standard_layout();
        let xs = xs.as_slice().expect("standard layout is contiguous");
        let mut y = vec![0.0f32; xs.len()];
        self.forward_eval_slice(xs, &dims, &mut y)?;
        Ok(ArrayD::from_shape_vec(IxDyn(&dims), y).expect("shape of x"))
    }

    fn backward(
        &mut self,
        x: ArrayViewD<'_, f32>,
        dy: ArrayViewD<'_, f32>,
        mode: Mode,
    ) -> Result<Gradients> {
        let dims = dims_of(&x);
        // Shape checks first so that a wrong dy is named as such.
        input_walk(&self.config, &dims, false)?;
        check_same_shape(x.shape(), dy.shape())?;
        let xs = x.as_standard_layout();
        let xs = xs.as_slice().expect("standard layout is contiguous");
        let dys = dy.as_standard_layout();
        let dys = dys.as_slice().expect("standard layout is contiguous");
        let c = self.config.num_features;
        let (mut dx, mut dw, mut db) = (vec![0.0f32; xs.len()], vec![0.0f32; c], vec![0.0f32; c]);
        self.backward_slice(xs, dys, &dims, mode, &mut dx, &mut dw, &mut db)?;
        let affine = self.config.affine;
        Ok(Gradients {
            dx: ArrayD::from_shape_vec(IxDyn(&dims), dx).expect("shape of x"),
            dweight: affine.then_some(dw),
            dbias: affine.then_some(db),
        })
    }

    fn saved_stats(&self) -> Result<Option<SavedStats>> {
        Ok(CpuBatchNorm::saved_stats(self))
    }

    fn state(&self) -> Result<BatchNormState> {
        Ok(self.state.clone())
    }

    fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        CpuBatchNorm::set_state(self, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layout;

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

    #[test]
    fn slice_length_errors_leave_the_layer_unchanged() {
        let mut bn = CpuBatchNorm::new(BatchNormConfig::new(3)).unwrap();
        let before = bn.state().clone();
        let x = vec![1.0f32; 12];
        let mut y = vec![0.0f32; 11];
        let e = bn.forward_train_slice(&x, &[4, 3], &mut y).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("y (a slice of 11 elements)"), "{e}");
        assert_eq!(bn.state(), &before);
        assert!(bn.saved_stats().is_none());
        let e = bn
            .forward_train_slice(&x[..3], &[1, 3], &mut y[..3])
            .unwrap_err();
        assert!(matches!(e, Error::SingleValuePerChannel { .. }), "{e}");
        assert_eq!(bn.state(), &before);
    }
}

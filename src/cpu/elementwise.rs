//! The elementwise passes of the fast CPU backend, `y = act((x - c) * s + b + z)`
//! and `dx = a dy + b (x - m) + c`, in parallel over contiguous segments
//! that share their coefficients, loading and storing any [`CpuElement`];
//! and the CPU's copy roofline.

use super::elem::{CpuElement, MAX_INPUTS};
use super::lanes::ROWS;
use super::plan::{ROW_WALK_BELOW, TASK};
use crate::error::{Error, Result};
use crate::fused::Activation;
use crate::shape::ChannelWalk;
use rayon::prelude::*;

/// Per-channel coefficients of an elementwise pass, as `f32` arrays.
pub(super) struct Coefs {
    /// One entry per channel, or per row position (`C * inner`) for a row walk.
    pub(super) per_position: bool,
    pub(super) k: [Vec<f32>; 4],
}

impl Coefs {
    /// Lays out per-channel coefficients for `walk`.
    pub(super) fn new(walk: &ChannelWalk, k: [Vec<f32>; 4]) -> Coefs {
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

/// Runs `f(out, inputs, coefficient slices or one value each)` over `out`
/// in parallel, one call per contiguous segment that shares its
/// coefficients (per-channel) or lies in one row (per-position), with the
/// same segment of each input (tensors as long as `out`) and `out` as `f32`:
/// each task's part converted once, a block at a time
/// ([`CpuElement::map`]; `f32` in place). With `in_place`, `out`'s own
/// values come as one more input after `inputs` ([`CpuElement::update`]).
pub(super) fn for_each_segment<E: CpuElement>(
    out: &mut [E],
    inputs: &[&[E]],
    in_place: bool,
    walk: &ChannelWalk,
    coefs: &Coefs,
    f: impl Fn(&mut [f32], &[&[f32]], Seg<'_>) + Sync,
) {
    let chunk = TASK
        .max(out.len().div_ceil(rayon::current_num_threads().max(1) * 4))
        .min(TASK * 4);
    out.par_chunks_mut(chunk).enumerate().for_each(|(t, o)| {
        let base = t * chunk;
        let ins: Vec<&[E]> = inputs.iter().map(|x| &x[base..base + o.len()]).collect();
        let pass = |off: usize, v: &[&[f32]], o: &mut [f32]| {
            let base = base + off;
            // Run and channel of the segment, advanced without a division per run
            // (two divisions per 7x7 run cost as much as the run itself).
            let mut run = base / walk.inner;
            let mut c = run % walk.channels;
            let mut i = 0;
            let mut parts = [&[][..]; MAX_INPUTS];
            while i < o.len() {
                let g = base + i;
                let k = &coefs.k;
                let (n, seg) = if coefs.per_position {
                    let cols = k[0].len();
                    let p = g % cols;
                    let n = (cols - p).min(o.len() - i);
                    let seg = Seg::Slices([
                        &k[0][p..p + n],
                        &k[1][p..p + n],
                        &k[2][p..p + n],
                        &k[3][p..p + n],
                    ]);
                    (n, seg)
                } else {
                    let n = ((run + 1) * walk.inner - g).min(o.len() - i);
                    run += 1;
                    let seg = Seg::Scalar([k[0][c], k[1][c], k[2][c], k[3][c]]);
                    c = if c + 1 == walk.channels { 0 } else { c + 1 };
                    (n, seg)
                };
                for (part, x) in parts.iter_mut().zip(v) {
                    *part = &x[i..i + n];
                }
                f(&mut o[i..i + n], &parts[..v.len()], seg);
                i += n;
            }
        };
        if in_place {
            E::update(&ins, o, pass);
        } else {
            E::map(&ins, o, pass);
        }
    });
}

/// Coefficients of one segment.
#[derive(Clone, Copy)]
pub(super) enum Seg<'a> {
    Scalar([f32; 4]),
    Slices([&'a [f32]; 4]),
}

/// What the forward's elementwise pass does after normalizing: add the
/// residual `z` (when given), then the activation.
#[derive(Clone, Copy)]
pub(super) struct Epilogue<'a, E> {
    /// The residual, as long as `x`.
    pub(super) z: Option<&'a [E]>,
    /// The activation after the add.
    pub(super) activation: Activation,
}

impl<E> Epilogue<'_, E> {
    /// The plain BatchNorm: no residual, the identity.
    pub(super) const NONE: Self = Epilogue {
        z: None,
        activation: Activation::Identity,
    };
}

/// A second operand of the normalize loops that may be absent: the
/// residual `z`, added to the normalized value, or `()`, which adds nothing
/// (not even `0.0`, which would turn `-0.0` into `0.0`).
trait Residual: Copy {
    /// The operand cut to `n` elements (so the loops index without checks).
    fn cut(self, n: usize) -> Self;
    /// `v` plus element `j`.
    fn add(self, v: f32, j: usize) -> f32;
}

impl Residual for () {
    #[inline(always)]
    fn cut(self, _: usize) -> Self {}
    #[inline(always)]
    fn add(self, v: f32, _: usize) -> f32 {
        v
    }
}

impl Residual for &[f32] {
    #[inline(always)]
    fn cut(self, n: usize) -> Self {
        &self[..n]
    }
    #[inline(always)]
    fn add(self, v: f32, j: usize) -> f32 {
        v + self[j]
    }
}

/// `y = act((x - c) * s + b + z)`, per position.
#[inline]
#[allow(clippy::needless_range_loop)]
fn normalize_row(
    y: &mut [f32],
    x: &[f32],
    z: impl Residual,
    [c, s, b]: [&[f32]; 3],
    act: impl Fn(f32) -> f32,
) {
    let n = y.len();
    let (x, z, c, s, b) = (&x[..n], z.cut(n), &c[..n], &s[..n], &b[..n]);
    for j in 0..n {
        y[j] = act(z.add((x[j] - c[j]) * s[j] + b[j], j));
    }
}

/// Calls `f(out_rows, rows)` over the rows of `cols` elements of `out`,
/// `rows` their indices: in parallel over tasks of whole rows, each walked
/// [`ROWS`] rows at a time, one from each quarter of the task's rows (long
/// streams, as in the row walk's reductions), then row by row for the rest.
/// The per-position coefficients of a row walk's pass are then loaded once
/// for [`ROWS`] rows: a row of 2048 channels' three coefficients (24 KiB)
/// does not stay in L1 beside the rows.
fn for_row_groups(out: &mut [f32], cols: usize, f: impl Fn(&mut [&mut [f32]], &[usize]) + Sync) {
    let chunk = TASK
        .max(out.len().div_ceil(rayon::current_num_threads().max(1) * 4))
        .min(TASK * 4);
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
fn normalize_rows<Z: Residual>(
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

/// `y = act((x - c) * s + b + z)` with one `c`, `s`, `b`.
#[inline]
#[allow(clippy::needless_range_loop)]
fn normalize_run(
    y: &mut [f32],
    x: &[f32],
    z: impl Residual,
    [c, s, b]: [f32; 3],
    act: impl Fn(f32) -> f32,
) {
    let n = y.len();
    let (x, z) = (&x[..n], z.cut(n));
    for j in 0..n {
        y[j] = act(z.add((x[j] - c) * s + b, j));
    }
}

/// `y = act((x - c) * s + b + z)` of one run with one `k = [c, s, b]`:
/// `v` is `[x]` or `[x, z]`.
#[inline(never)]
pub(super) fn normalize_seg(y: &mut [f32], v: &[&[f32]], k: [f32; 3], act: Activation) {
    let relu = |v| Activation::Relu.apply(v);
    match (v.get(1).copied(), act) {
        (None, Activation::Identity) => normalize_run(y, v[0], (), k, |v| v),
        (None, Activation::Relu) => normalize_run(y, v[0], (), k, relu),
        (Some(z), Activation::Identity) => normalize_run(y, v[0], z, k, |v| v),
        (Some(z), Activation::Relu) => normalize_run(y, v[0], z, k, relu),
    }
}

/// `dx = a dy + b (x - m) + c` per position, coefficients `[m, a, b, c]`;
/// where `b = 0` (running statistics) `x` does not enter, so a NaN in `x`
/// stays out, as in PyTorch's evaluation backward.
#[inline]
#[allow(clippy::needless_range_loop)]
pub(super) fn backward_dx_row(dx: &mut [f32], x: &[f32], dy: &[f32], [m, a, b, c]: [&[f32]; 4]) {
    let n = dx.len();
    let (x, dy, m, a, b, c) = (&x[..n], &dy[..n], &m[..n], &a[..n], &b[..n], &c[..n]);
    for j in 0..n {
        // Both sides computed, then a select: LLVM vectorizes this form (a
        // branch here kept the loop scalar, 2x slower on `(N, C)` backward).
        let t = b[j] * (x[j] - m[j]);
        let xt = if b[j] == 0.0 { 0.0 } else { t };
        dx[j] = a[j] * dy[j] + xt + c[j];
    }
}

/// `y = act((x - center) * scale + shift + z)`, coefficients
/// `[center, scale, shift, _]`; the residual and the activation of `epi`
/// ride on the same pass, each fusion a loop of its own.
pub(super) fn normalize<E: CpuElement>(
    x: &[E],
    y: &mut [E],
    walk: &ChannelWalk,
    coefs: &Coefs,
    epi: Epilogue<'_, E>,
) {
    let relu = |v| Activation::Relu.apply(v);
    match (epi.z, epi.activation) {
        (None, Activation::Identity) => normalize_with(x, None, y, walk, coefs, |v| v),
        (None, Activation::Relu) => normalize_with(x, None, y, walk, coefs, relu),
        (Some(z), Activation::Identity) => normalize_with(x, Some(z), y, walk, coefs, |v| v),
        (Some(z), Activation::Relu) => normalize_with(x, Some(z), y, walk, coefs, relu),
    }
}

/// [`normalize`] with the activation `act`.
fn normalize_with<E: CpuElement>(
    x: &[E],
    z: Option<&[E]>,
    y: &mut [E],
    walk: &ChannelWalk,
    coefs: &Coefs,
    act: impl Fn(f32) -> f32 + Copy + Sync,
) {
    if coefs.per_position
        && let (Some(xf), Some(yf)) = (E::as_f32(x), E::as_f32_mut(&mut *y))
    {
        let k = [&coefs.k[0][..], &coefs.k[1][..], &coefs.k[2][..]];
        match z.map(E::as_f32) {
            None => return normalize_rows(xf, |_| (), yf, k, act),
            Some(Some(zf)) => return normalize_rows(xf, |r| &zf[r], yf, k, act),
            Some(None) => {}
        }
    }
    let inputs: &[&[E]] = match z {
        Some(z) => &[x, z],
        None => &[x],
    };
    for_each_segment(y, inputs, false, walk, coefs, |y, v, seg| {
        match (seg, v.get(1).copied()) {
            (Seg::Scalar([c, s, b, _]), None) => normalize_run(y, v[0], (), [c, s, b], act),
            (Seg::Scalar([c, s, b, _]), Some(z)) => normalize_run(y, v[0], z, [c, s, b], act),
            (Seg::Slices([c, s, b, _]), None) => normalize_row(y, v[0], (), [c, s, b], act),
            (Seg::Slices([c, s, b, _]), Some(z)) => normalize_row(y, v[0], z, [c, s, b], act),
        }
    });
}

/// `dx = a * dy + b * (x - center) + c`, coefficients `[center, a, b, c]`;
/// with `dy = None`, in place: `dx` holds the upstream gradient (the gated
/// `dy` a fused backward's reductions wrote there) and is overwritten.
pub(super) fn backward_dx<E: CpuElement>(
    x: &[E],
    dy: Option<&[E]>,
    dx: &mut [E],
    walk: &ChannelWalk,
    coefs: &Coefs,
) {
    let (inputs, in_place): (&[&[E]], bool) = match dy {
        Some(dy) => (&[x, dy], false),
        None => (&[x], true),
    };
    for_each_segment(dx, inputs, in_place, walk, coefs, |dx, v, seg| {
        let (x, dy) = (v[0], v[1]);
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
/// `bnorm bench` (8 bytes of traffic per `f32` element, 4 per `f16`).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn parallel_copy<E: CpuElement>(src: &[E], dst: &mut [E]) -> Result<()> {
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
        .for_each(|(d, s)| E::copy_run(s, d));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

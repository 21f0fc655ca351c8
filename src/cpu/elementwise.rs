//! The elementwise passes of the fast CPU backend, `y = (x - c) * s + b`
//! and `dx = a dy + b (x - m) + c`, in parallel over contiguous segments
//! that share their coefficients, loading and storing any [`CpuElement`];
//! and the CPU's copy roofline.

use super::elem::{CpuElement, MAX_INPUTS};
use super::plan::{ROW_WALK_BELOW, TASK};
use crate::error::{Error, Result};
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
/// ([`CpuElement::map`]; `f32` in place).
pub(super) fn for_each_segment<E: CpuElement>(
    out: &mut [E],
    inputs: &[&[E]],
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
        E::map(&ins, o, |off, v, o| {
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
        });
    });
}

/// Coefficients of one segment.
#[derive(Clone, Copy)]
pub(super) enum Seg<'a> {
    Scalar([f32; 4]),
    Slices([&'a [f32]; 4]),
}

/// `y = (x - c) * s + b`, per position.
#[inline]
#[allow(clippy::needless_range_loop)]
pub(super) fn normalize_row(y: &mut [f32], x: &[f32], c: &[f32], s: &[f32], b: &[f32]) {
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

/// `y = (x - center) * scale + shift`, coefficients `[center, scale, shift, _]`.
pub(super) fn normalize<E: CpuElement>(x: &[E], y: &mut [E], walk: &ChannelWalk, coefs: &Coefs) {
    for_each_segment(y, &[x], walk, coefs, |y, v, seg| {
        let x = v[0];
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
pub(super) fn backward_dx<E: CpuElement>(
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    walk: &ChannelWalk,
    coefs: &Coefs,
) {
    for_each_segment(dx, &[x, dy], walk, coefs, |dx, v, seg| {
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

//! The inner loops of the reductions: [`LANES`] independent `f32`
//! accumulators over contiguous runs, and per-position accumulators over
//! rows (channels-last and short-run walks). The loops are `f32`; the
//! functions the reductions call take any [`CpuElement`] and run them on
//! its blocks as `f32` ([`CpuElement::read`]).

use super::elem::CpuElement;
use crate::fused::Activation;

/// Independent accumulators of the inner loops (a multiple of every SIMD width).
pub(super) const LANES: usize = 16;

/// [`LANES`] independent `f32` accumulators (the compiler keeps them in SIMD
/// registers) and an `f64` tail for the elements past the last full chunk.
///
/// The functions that add to them are `#[inline(never)]`: on their own they
/// compile to packed SIMD (`subps`, `mulps`, `addps` on x86-64), while
/// inlined into the piece loops LLVM vectorized across chunks instead, with
/// strided scalar loads (twice slower on 7x7 runs).
#[derive(Debug, Clone, Copy)]
pub(super) struct Lanes {
    pub(super) v: [f32; LANES],
    pub(super) tail: f64,
}

impl Lanes {
    pub(super) fn new() -> Self {
        Self {
            v: [0.0; LANES],
            tail: 0.0,
        }
    }

    /// The sum of every lane and the tail, in `f64`.
    pub(super) fn total(&self) -> f64 {
        self.v.iter().map(|&v| f64::from(v)).sum::<f64>() + self.tail
    }
}

/// Values whose mean is the shift of a first piece, slab or block.
pub(super) const SAMPLE: usize = 256;

/// The mean of `x` (a few values), in `f32`.
pub(super) fn prefix_mean<E: CpuElement>(x: &[E]) -> f32 {
    (x.iter().map(|&v| f64::from(v.load())).sum::<f64>() / x.len() as f64) as f32
}

/// Whether sums `s1 = sum(x - k)`, `s2 = sum((x - k)^2)` of `n` values
/// around a shift `k` give their second moment `s2 - s1^2/n` to within a
/// bit: where the values' mean lies within one standard deviation of `k`
/// (`s1^2/n <= s2/2`). False for NaN and infinite sums.
#[inline]
pub(super) fn fits_one_pass(s1: f64, s2: f64, n: f64) -> bool {
    s1 * s1 <= 0.5 * s2 * n
}

/// `acc += sum(x)`.
#[inline]
pub(super) fn add_sum<E: CpuElement>(acc: &mut Lanes, x: &[E]) {
    E::read(&[x], |_, v| sum_f32(acc, v[0]));
}

/// `s1 += sum(x - m)`, `s2 += sum((x - m)^2)`.
#[inline]
pub(super) fn add_centered<E: CpuElement>(s1: &mut Lanes, s2: &mut Lanes, x: &[E], m: f32) {
    E::read(&[x], |_, v| centered_f32(s1, s2, v[0], m));
}

/// `s1 += sum(dy)`, `s2 += sum(dy * (x - center))`.
#[inline]
pub(super) fn add_grad<E: CpuElement>(
    s1: &mut Lanes,
    s2: &mut Lanes,
    x: &[E],
    dy: &[E],
    center: f32,
) {
    E::read(&[x, dy], |_, v| grad_f32(s1, s2, v[0], v[1], center));
}

/// `g = gate(y, dy)` (the ReLU's [`Activation::gate`]) stored into `out`,
/// and `s1 += sum(g)`, `s2 += sum(g * (x - center))`, in one loop.
#[inline]
pub(super) fn add_grad_gated<E: CpuElement>(
    s1: &mut Lanes,
    s2: &mut Lanes,
    [x, dy, y]: [&[E]; 3],
    out: &mut [E],
    center: f32,
) {
    E::map(&[x, dy, y], out, |_, v, o| {
        gated_grad_f32(s1, s2, [v[0], v[1], v[2]], o, center)
    });
}

/// `acc += sum of the rows`, per position.
#[inline]
pub(super) fn add_rows<E: CpuElement, const R: usize>(acc: &mut [f32], rows: [&[E]; R]) {
    let n = acc.len();
    let rows = rows.map(|r| &r[..n]);
    E::read(&rows, |s, v| {
        let acc = &mut acc[s..s + v[0].len()];
        rows_f32::<R>(acc, std::array::from_fn(|r| v[r]));
    });
}

/// `s1 += row - m`, `s2 += (row - m)^2`, per position, summed over the rows.
#[inline]
pub(super) fn add_rows_centered<E: CpuElement, const R: usize>(
    s1: &mut [f32],
    s2: &mut [f32],
    m: &[f32],
    rows: [&[E]; R],
) {
    let n = s1.len();
    let rows = rows.map(|r| &r[..n]);
    E::read(&rows, |s, v| {
        let span = s..s + v[0].len();
        let (s1, s2, m) = (&mut s1[span.clone()], &mut s2[span.clone()], &m[span]);
        rows_centered_f32::<R>(s1, s2, m, std::array::from_fn(|r| v[r]));
    });
}

/// `s1 += dy`, `s2 += dy * (x - center)`, per position, summed over the rows.
#[inline]
pub(super) fn add_rows_grad<E: CpuElement, const R: usize>(
    s1: &mut [f32],
    s2: &mut [f32],
    center: &[f32],
    x: [&[E]; R],
    dy: [&[E]; R],
) {
    let n = s1.len();
    let mut rows = [&[][..]; 2 * ROWS];
    for (k, r) in x.iter().chain(&dy).enumerate() {
        rows[k] = &r[..n];
    }
    E::read(&rows[..2 * R], |s, v| {
        let span = s..s + v[0].len();
        let (s1, s2, c) = (&mut s1[span.clone()], &mut s2[span.clone()], &center[span]);
        let (x, dy) = (
            std::array::from_fn(|r| v[r]),
            std::array::from_fn(|r| v[R + r]),
        );
        rows_grad_f32::<R>(s1, s2, c, x, dy);
    });
}

/// `acc += sum(x)`.
#[inline(never)]
fn sum_f32(acc: &mut Lanes, x: &[f32]) {
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
fn centered_f32(s1: &mut Lanes, s2: &mut Lanes, x: &[f32], m: f32) {
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
fn grad_f32(s1: &mut Lanes, s2: &mut Lanes, x: &[f32], dy: &[f32], center: f32) {
    grad_lanes::<false>(s1, s2, [x, dy, &[]], &mut [], center);
}

/// `g = gate(y, dy)` into `out`, `s1 += sum(g)`, `s2 += sum(g * (x - center))`.
#[inline(never)]
fn gated_grad_f32(s1: &mut Lanes, s2: &mut Lanes, xdy: [&[f32]; 3], out: &mut [f32], center: f32) {
    grad_lanes::<true>(s1, s2, xdy, out, center);
}

/// The loop of [`grad_f32`] and, with `GATE`, of [`gated_grad_f32`]: the
/// gradient of each chunk is `dy`, or `dy` gated by `y` and stored into
/// `out` (without `GATE`, `y` and `out` are empty and not touched).
#[inline(always)]
fn grad_lanes<const GATE: bool>(
    s1: &mut Lanes,
    s2: &mut Lanes,
    [x, dy, y]: [&[f32]; 3],
    out: &mut [f32],
    center: f32,
) {
    let gate = |y: f32, g: f32| Activation::Relu.gate(y, g);
    let (xc, xr) = x.as_chunks::<LANES>();
    let (gc, gr) = dy.as_chunks::<LANES>();
    let (yc, yr) = y.as_chunks::<LANES>();
    let (oc, or) = out.as_chunks_mut::<LANES>();
    let (mut a1, mut a2) = (s1.v, s2.v);
    for (k, (a, g)) in xc.iter().zip(gc).enumerate() {
        let g = if GATE {
            oc[k] = std::array::from_fn(|l| gate(yc[k][l], g[l]));
            &oc[k]
        } else {
            g
        };
        let d: [f32; LANES] = std::array::from_fn(|l| a[l] - center);
        a1 = std::array::from_fn(|l| a1[l] + g[l]);
        a2 = std::array::from_fn(|l| a2[l] + g[l] * d[l]);
    }
    (s1.v, s2.v) = (a1, a2);
    for (k, (&a, &g)) in xr.iter().zip(gr).enumerate() {
        let g = if GATE {
            or[k] = gate(yr[k], g);
            or[k]
        } else {
            g
        };
        s1.tail += f64::from(g);
        s2.tail += f64::from(g * (a - center));
    }
}

// The row loops below index slices cut to one length, the form LLVM
// vectorizes most reliably (long `zip` chains sometimes stay scalar). They
// take `R` rows at once: the per-position accumulators are loaded and stored
// once per `R` rows instead of once per row, which bound the row walk.

/// Rows the row loops below take at once.
pub(super) const ROWS: usize = 4;

/// `acc += sum of the rows`, per position.
#[inline]
#[allow(clippy::needless_range_loop)]
fn rows_f32<const R: usize>(acc: &mut [f32], rows: [&[f32]; R]) {
    let n = acc.len();
    let rows = rows.map(|r| &r[..n]);
    for j in 0..n {
        let mut t = rows[0][j];
        for r in &rows[1..] {
            t += r[j];
        }
        acc[j] += t;
    }
}

/// `s1 += row - m`, `s2 += (row - m)^2`, per position, summed over the rows.
#[inline]
#[allow(clippy::needless_range_loop)]
fn rows_centered_f32<const R: usize>(s1: &mut [f32], s2: &mut [f32], m: &[f32], rows: [&[f32]; R]) {
    let n = s1.len();
    let (s2, m) = (&mut s2[..n], &m[..n]);
    let rows = rows.map(|r| &r[..n]);
    for j in 0..n {
        let d = rows[0][j] - m[j];
        let (mut t1, mut t2) = (d, d * d);
        for r in &rows[1..] {
            let d = r[j] - m[j];
            t1 += d;
            t2 += d * d;
        }
        s1[j] += t1;
        s2[j] += t2;
    }
}

/// `s1 += dy`, `s2 += dy * (x - center)`, per position, summed over the rows.
#[inline]
#[allow(clippy::needless_range_loop)]
fn rows_grad_f32<const R: usize>(
    s1: &mut [f32],
    s2: &mut [f32],
    center: &[f32],
    x: [&[f32]; R],
    dy: [&[f32]; R],
) {
    let n = s1.len();
    let (s2, center) = (&mut s2[..n], &center[..n]);
    let (x, dy) = (x.map(|r| &r[..n]), dy.map(|r| &r[..n]));
    for j in 0..n {
        let (mut t1, mut t2) = (dy[0][j], dy[0][j] * (x[0][j] - center[j]));
        for r in 1..R {
            t1 += dy[r][j];
            t2 += dy[r][j] * (x[r][j] - center[j]);
        }
        s1[j] += t1;
        s2[j] += t2;
    }
}

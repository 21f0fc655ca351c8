//! The `f32` inner loops of the elementwise passes: normalize a run with
//! one set of coefficients or a row with per-position ones (with the
//! residual and the activation of a fused forward), and `dx` of a row.
//! They index slices cut to one length, the form LLVM vectorizes.

use crate::fused::Activation;

/// A second operand of the normalize loops that may be absent: the
/// residual `z`, added to the normalized value, or `()`, which adds nothing
/// (not even `0.0`, which would turn `-0.0` into `0.0`).
pub(super) trait Residual: Copy {
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
pub(super) fn normalize_row(
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

/// `y = act((x - c) * s + b + z)` with one `c`, `s`, `b`.
#[inline]
#[allow(clippy::needless_range_loop)]
pub(super) fn normalize_run(
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

/// `dx = a dy + b (x - m) + c` of one run; where `b = 0` (running
/// statistics) `x` does not enter, so a NaN in `x` stays out, as in
/// PyTorch's evaluation backward.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(super) fn dx_run(dx: &mut [f32], x: &[f32], dy: &[f32], [m, a, b, c]: [f32; 4]) {
    let n = dx.len();
    let (x, dy) = (&x[..n], &dy[..n]);
    if b == 0.0 {
        for j in 0..n {
            dx[j] = a * dy[j] + c;
        }
    } else {
        for j in 0..n {
            dx[j] = a * dy[j] + b * (x[j] - m) + c;
        }
    }
}

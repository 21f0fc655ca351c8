//! The per-channel coefficients of the elementwise passes, from the
//! channel's statistics or gradient sums (`f64`), as the `f32` values the
//! loops use: the rounding of the centre to `f32` is folded into the
//! shift, so large means cost no precision.

/// The forward's `[c32, s, b]` (`y = (x - c32) s + b`) of a channel with
/// batch `mean` and `invstd`:
///
/// ```text
/// s = weight invstd,  b = bias + (c32 - mean) s,  c32 = mean rounded to f32
/// ```
pub(super) fn norm_coefs(mean: f64, invstd: f64, weight: f64, bias: f64) -> [f32; 3] {
    let c32 = mean as f32;
    let s = weight * invstd;
    [c32, s as f32, (bias + (f64::from(c32) - mean) * s) as f32]
}

/// `dweight`, `dbias` and the `dx` coefficients `[c32, a, b, c]` of a
/// channel (`dx = a dy + b (x - c32) + c`) from its sums `(sum(dy),
/// sum(dy (x - center)))` over `m` values, its `center` and `invstd`; with
/// `batch` false (running statistics) `b = c = 0`.
pub(super) fn grad_coefs(
    weight: f64,
    (center, invstd): (f64, f64),
    (s1, s2): (f64, f64),
    m: usize,
    batch: bool,
) -> (f32, f32, [f32; 4]) {
    let mf = m as f64;
    let a = weight * invstd;
    let (b, cc) = if batch {
        (-a * invstd * invstd * s2 / mf, -a * s1 / mf)
    } else {
        (0.0, 0.0)
    };
    let c32 = center as f32;
    let shift = cc + b * (f64::from(c32) - center);
    let k = [c32, a as f32, b as f32, shift as f32];
    ((s2 * invstd) as f32, s1 as f32, k)
}

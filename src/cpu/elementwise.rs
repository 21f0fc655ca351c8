//! The elementwise passes of the fast CPU backend, `y = act((x - c) * s + b + z)`
//! and `dx = a dy + b (x - m) + c`, in parallel over contiguous segments
//! that share their coefficients, loading and storing any [`CpuElement`];
//! and the CPU's copy roofline.

use super::elem::{CpuElement, MAX_INPUTS};
use super::fast32::{backward_dx_runs, normalize_rows, normalize_runs};
use super::kernels::{backward_dx_row, normalize_row, normalize_run};
use super::plan::{BLOCK_WALK_BELOW, ROW_WALK_BELOW, TASK};
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
    let k = [&coefs.k[0][..], &coefs.k[1][..], &coefs.k[2][..]];
    let short = walk.inner < BLOCK_WALK_BELOW;
    if let (Some(xf), Some(yf)) = (E::as_f32(x), E::as_f32_mut(&mut *y)) {
        match (z.map(E::as_f32), coefs.per_position) {
            (None, true) => return normalize_rows(xf, |_| (), yf, k, act),
            (Some(Some(zf)), true) => return normalize_rows(xf, |r| &zf[r], yf, k, act),
            (None, false) if short => return normalize_runs(xf, |_| (), yf, walk, k, act),
            (Some(Some(zf)), false) if short => {
                return normalize_runs(xf, |r| &zf[r], yf, walk, k, act);
            }
            _ => {}
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
    if !coefs.per_position
        && walk.inner < BLOCK_WALK_BELOW
        && let (Some(xf), Some(dyf), Some(dxf)) = (
            E::as_f32(x),
            dy.and_then(E::as_f32),
            E::as_f32_mut(&mut *dx),
        )
    {
        let k = &coefs.k;
        return backward_dx_runs(xf, dyf, dxf, walk, [&k[0], &k[1], &k[2], &k[3]]);
    }
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

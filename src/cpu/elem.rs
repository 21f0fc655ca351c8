//! The element types the fast CPU backend stores: `f32` and `half::f16`.
//! Every kernel is generic over [`CpuElement`] and runs its `f32` code on
//! blocks of its inputs as `f32` ([`CpuElement::read`], [`CpuElement::map`]):
//! the `f32` slices themselves, or f16 blocks widened by [`super::convert`]
//! (eight at a time with the CPU's F16C instructions where it has them), so
//! the sums are those of `f32` storage on the same values (`f32` lanes,
//! `f64` partials) and results are rounded to f16 when stored.
//!
//! Single elements ([`CpuElement::load`], [`CpuElement::store`]) convert
//! with branch-free integer and float operations, which the compiler
//! vectorizes where they sit in a loop:
//!
//! ```text
//! load:  bits (h & 0x7fff) << 13, exponent rebiased by 127 - 15;
//!        Inf/NaN: exponent forced to 255; subnormal: (bits + 2^-14 bias) - 2^-14
//! store: |v| >= 65520        -> Inf (NaN -> quiet NaN 0x7e00)
//!        |v| <  2^-14        -> (|v| + 0.5) mantissa bits: the FPU rounds to even
//!        otherwise           -> exponent rebiased, + 0xfff + odd bit, >> 13 (ties to even)
//! ```

use super::convert::{narrow, widen};
use crate::layout::DType;
use half::f16;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// An element type the fast CPU backend stores: `f32` or `half::f16`.
/// Arithmetic is `f32` (accumulation `f32` lanes merged in `f64`) for both.
///
/// ```
/// use half::f16;
/// use wgpu_batchnorm::cpu::CpuElement;
/// assert_eq!(f16::from_f32(0.1).load(), f16::from_f32(0.1).to_f32());
/// assert_eq!(<f16 as CpuElement>::store(65519.0), f16::from_f32(65519.0));
/// ```
pub trait CpuElement: Copy + Send + Sync + std::fmt::Debug + sealed::Sealed + 'static {
    /// The storage type this element is.
    const DTYPE: DType;

    /// The element as `f32` (exact).
    fn load(self) -> f32;

    /// `v` rounded to this type (to nearest, ties to even).
    fn store(v: f32) -> Self;

    /// A plain copy of `src` into `dst` (same length) in a loop like the
    /// kernels', not a `memcpy` (whose non-temporal stores would send a
    /// cache-sized copy to DRAM while the kernels' ordinary stores stay in
    /// cache): the copy roofline of `bnorm bench`.
    fn copy_run(src: &[Self], dst: &mut [Self]);

    /// Calls `f(offset, inputs)` with the `inputs` (at most [`MAX_INPUTS`]
    /// slices of one length) as `f32`, a block at a time: `f32` in one call
    /// without a copy; `f16` converted in blocks of [`BLOCK`] elements (with
    /// the CPU's F16C instructions where it has them), into a per-thread buffer. `f` must not call `read` or `map` itself.
    #[doc(hidden)]
    fn read(inputs: &[&[Self]], f: impl FnMut(usize, &[&[f32]]));

    /// As [`CpuElement::read`], with an output as long as the inputs: `f`
    /// writes `f32` values into its output block, which are stored (rounded)
    /// into `out`.
    #[doc(hidden)]
    fn map(inputs: &[&[Self]], out: &mut [Self], f: impl FnMut(usize, &[&[f32]], &mut [f32]));

    /// As [`CpuElement::map`], in place: `f` gets `out`'s current values as
    /// one more input after `inputs`, a block at a time, each block read
    /// before `f` writes it (`f32` copies the block into the per-thread
    /// buffer; `f16` widens it there like the inputs).
    #[doc(hidden)]
    fn update(inputs: &[&[Self]], out: &mut [Self], f: impl FnMut(usize, &[&[f32]], &mut [f32]));

    /// `x` as a slice of this type, when this type is `f32` (no copy).
    #[doc(hidden)]
    fn from_f32_slice(x: &[f32]) -> Option<&[Self]>;

    /// `x` as `f32`, when this type is `f32` (no copy).
    #[doc(hidden)]
    fn as_f32(x: &[Self]) -> Option<&[f32]>;

    /// `x` as `f32`, when this type is `f32` (no copy).
    #[doc(hidden)]
    fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]>;

    /// `v` as a `Vec<f32>`, when this type is `f32` (no copy); else `v` back.
    #[doc(hidden)]
    fn into_f32_vec(v: Vec<Self>) -> Result<Vec<f32>, Vec<Self>>;
}

impl CpuElement for f32 {
    const DTYPE: DType = DType::F32;

    #[inline(always)]
    fn load(self) -> f32 {
        self
    }

    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }

    fn copy_run(src: &[f32], dst: &mut [f32]) {
        // `+ 0.0` keeps LLVM from calling memcpy.
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s + 0.0;
        }
    }

    #[inline(always)]
    fn read(inputs: &[&[f32]], mut f: impl FnMut(usize, &[&[f32]])) {
        f(0, inputs);
    }

    #[inline(always)]
    fn map(inputs: &[&[f32]], out: &mut [f32], mut f: impl FnMut(usize, &[&[f32]], &mut [f32])) {
        f(0, inputs, out);
    }

    fn update(inputs: &[&[f32]], out: &mut [f32], mut f: impl FnMut(usize, &[&[f32]], &mut [f32])) {
        SCRATCH.with_borrow_mut(|buf| {
            let k = inputs.len();
            let (ins, _) = scratch(buf, k + 1);
            let n = out.len();
            for s in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - s);
                let old = &mut ins[..len];
                old.copy_from_slice(&out[s..s + len]);
                let mut views = [&[][..]; MAX_INPUTS];
                for (v, x) in views.iter_mut().zip(inputs) {
                    *v = &x[s..s + len];
                }
                views[k] = old;
                f(s, &views[..=k], &mut out[s..s + len]);
            }
        });
    }

    fn from_f32_slice(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }

    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }

    fn as_f32_mut(x: &mut [f32]) -> Option<&mut [f32]> {
        Some(x)
    }

    fn into_f32_vec(v: Vec<f32>) -> Result<Vec<f32>, Vec<f32>> {
        Ok(v)
    }
}

impl CpuElement for f16 {
    const DTYPE: DType = DType::F16;

    #[inline(always)]
    fn load(self) -> f32 {
        f16_to_f32(self.to_bits())
    }

    #[inline(always)]
    fn store(v: f32) -> Self {
        f16::from_bits(f32_to_f16(v))
    }

    fn copy_run(src: &[f16], dst: &mut [f16]) {
        // XOR with a zero the compiler cannot see keeps LLVM from calling memcpy.
        let zero = std::hint::black_box(0u16);
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f16::from_bits(s.to_bits() ^ zero);
        }
    }

    fn read(inputs: &[&[f16]], mut f: impl FnMut(usize, &[&[f32]])) {
        SCRATCH.with_borrow_mut(|buf| {
            let (ins, _) = scratch(buf, inputs.len());
            let n = inputs.first().map_or(0, |x| x.len());
            for s in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - s);
                let views = widen_block(ins, inputs, None, s, len);
                f(s, &views[..inputs.len()]);
            }
        });
    }

    fn map(inputs: &[&[f16]], out: &mut [f16], f: impl FnMut(usize, &[&[f32]], &mut [f32])) {
        map_f16(inputs, out, false, f);
    }

    fn update(inputs: &[&[f16]], out: &mut [f16], f: impl FnMut(usize, &[&[f32]], &mut [f32])) {
        map_f16(inputs, out, true, f);
    }

    fn from_f32_slice(_: &[f32]) -> Option<&[f16]> {
        None
    }

    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }

    fn as_f32_mut(_: &mut [f16]) -> Option<&mut [f32]> {
        None
    }

    fn into_f32_vec(v: Vec<f16>) -> Result<Vec<f32>, Vec<f16>> {
        Err(v)
    }
}

/// Elements of one block that [`CpuElement::read`] and [`CpuElement::map`]
/// convert at a time (a multiple of the reductions' 16 lanes, so a block
/// boundary never changes which lane an element is added to).
pub const BLOCK: usize = 512;

/// Inputs [`CpuElement::read`] and [`CpuElement::map`] take at most (a row
/// reduction's 4 rows of `x` and 4 of `dy`).
pub const MAX_INPUTS: usize = 8;

thread_local! {
    /// Per-thread blocks of converted inputs and of an output.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The scratch space split into `k` input blocks and one output block.
fn scratch(buf: &mut Vec<f32>, k: usize) -> (&mut [f32], &mut [f32]) {
    assert!(k <= MAX_INPUTS, "{k} inputs, at most {MAX_INPUTS}");
    if buf.len() < (MAX_INPUTS + 1) * BLOCK {
        buf.resize((MAX_INPUTS + 1) * BLOCK, 0.0);
    }
    buf.split_at_mut(MAX_INPUTS * BLOCK)
}

/// [`CpuElement::map`] (`read_out` false) and [`CpuElement::update`]
/// (`read_out`: `out`'s block widened as the last input) of f16.
fn map_f16(
    inputs: &[&[f16]],
    out: &mut [f16],
    read_out: bool,
    mut f: impl FnMut(usize, &[&[f32]], &mut [f32]),
) {
    SCRATCH.with_borrow_mut(|buf| {
        let k = inputs.len() + usize::from(read_out);
        let (ins, o) = scratch(buf, k);
        let n = out.len();
        for s in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - s);
            let views = widen_block(ins, inputs, read_out.then_some(&out[..]), s, len);
            f(s, &views[..k], &mut o[..len]);
            narrow(&o[..len], &mut out[s..s + len]);
        }
    });
}

/// Elements `s..s + len` of each input (and of `last`, when given, after
/// them), widened into the input blocks.
fn widen_block<'a>(
    ins: &'a mut [f32],
    inputs: &[&[f16]],
    last: Option<&[f16]>,
    s: usize,
    len: usize,
) -> [&'a [f32]; MAX_INPUTS] {
    for (b, x) in ins
        .chunks_mut(BLOCK)
        .zip(inputs.iter().copied().chain(last))
    {
        widen(&x[s..s + len], &mut b[..len]);
    }
    let ins: &'a [f32] = ins;
    let mut blocks = ins.chunks(BLOCK);
    std::array::from_fn(|_| blocks.next().map_or(&[][..], |b| &b[..len]))
}

/// f16 bits to `f32`, exact (NaN stays NaN with its payload), without branches.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let o = (h & 0x7fff) << 13;
    let exp = o & SHIFTED_EXP;
    let o = o + ((127 - 15) << 23);
    // Inf/NaN: the exponent becomes 255.
    let inf_nan = o + ((128 - 16) << 23);
    // Subnormal (and zero): renormalized by the FPU.
    let sub = f32::from_bits(o + (1 << 23)) - f32::from_bits(113 << 23);
    let o = if exp == SHIFTED_EXP {
        inf_nan
    } else if exp == 0 {
        sub.to_bits()
    } else {
        o
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// `f32` to f16 bits, rounded to nearest with ties to even, overflow to
/// infinity, NaN to a quiet NaN; without branches.
#[inline(always)]
fn f32_to_f16(v: f32) -> u16 {
    const F32_INF: u32 = 255 << 23;
    const F16_MAX: u32 = (127 + 16) << 23;
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let bits = v.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let big = if a > F32_INF { 0x7e00 } else { 0x7c00 };
    // Below the smallest normal f16: adding 0.5 lines the f16 subnormal
    // mantissa up with the f32 one, and the addition rounds to even.
    let small = (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC);
    // Normal: rebias the exponent, round the 13 dropped bits to even.
    let odd = (a >> 13) & 1;
    let rebias = (15u32.wrapping_sub(127) << 23).wrapping_add(0xfff);
    let normal = a.wrapping_add(rebias).wrapping_add(odd) >> 13;
    let o = if a >= F16_MAX {
        big
    } else if a < (113 << 23) {
        small
    } else {
        normal
    };
    (o | (sign >> 16)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_exact_for_every_f16() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}: {got}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn store_rounds_like_half() {
        // Every f32 with a stride that visits every exponent and sign, plus
        // the halfway points between neighbouring f16 values and their
        // neighbours (the ties and near-ties).
        let check = |v: f32| {
            let want = f16::from_f32(v);
            let got = f32_to_f16(v);
            if v.is_nan() {
                assert!(f16::from_bits(got).is_nan(), "{v}: {got:#06x}");
            } else {
                assert_eq!(got, want.to_bits(), "{v:e} ({:#010x})", v.to_bits());
            }
        };
        for b in (0..=u32::MAX).step_by(4093) {
            check(f32::from_bits(b));
        }
        for h in 0..0x7c00u16 {
            let lo = f16::from_bits(h).to_f32();
            let hi = f16::from_bits(h + 1).to_f32();
            let mid = 0.5 * (lo + hi);
            for v in [
                mid,
                mid.next_down(),
                mid.next_up(),
                lo,
                -mid,
                -mid.next_up(),
            ] {
                check(v);
            }
        }
        for v in [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            65504.0,
            65520.0,
        ] {
            check(v);
        }
    }
}

//! Blocks of f16 widened to `f32` and `f32` rounded to f16, for the f16
//! kernels ([`super::elem`]).
//!
//! On x86-64 CPUs with F16C (checked at run time) eight elements convert in
//! one instruction (`vcvtph2ps`, `vcvtps2ph` rounding to nearest even) in a
//! loop compiled for F16C; elsewhere `half`'s slice conversions. `half`'s own
//! F16C path calls a function per eight elements: with it the f16 kernels
//! took 2-5x the time of the f32 ones on cache-resident tensors, with this
//! loop about 1.5-2x (the conversions are passes of their own over each
//! block), and 0.8x on a tensor past the caches, where f16 halves the
//! traffic (`bnorm bench --backend cpu`, 2-thread AMD EPYC, 32x64x56x56 NCHW).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// `dst = src` widened to `f32` (exact). The slices have one length.
pub(super) fn widen(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX, checked just above.
        unsafe { x86::widen(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

/// `dst = src` rounded to f16 (to nearest, ties to even; overflow to
/// infinity). The slices have one length.
pub(super) fn narrow(src: &[f32], dst: &mut [f16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX, checked just above.
        unsafe { x86::narrow(src, dst) };
        return;
    }
    dst.convert_from_f32_slice(src);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::{_MM_FROUND_TO_NEAREST_INT, _mm256_cvtph_ps, _mm256_cvtps_ph};

    /// [`super::widen`] with F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) fn widen(src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let (sc, sr) = src.as_chunks::<8>();
        let (dc, dr) = dst.as_chunks_mut::<8>();
        for (s, d) in sc.iter().zip(dc) {
            *d = bytemuck::cast(_mm256_cvtph_ps(bytemuck::cast(*s)));
        }
        for (s, d) in sr.iter().zip(dr) {
            *d = s.to_f32();
        }
    }

    /// [`super::narrow`] with F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) fn narrow(src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len());
        let (sc, sr) = src.as_chunks::<8>();
        let (dc, dr) = dst.as_chunks_mut::<8>();
        for (s, d) in sc.iter().zip(dc) {
            *d = bytemuck::cast(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                bytemuck::cast(*s),
            ));
        }
        for (s, d) in sr.iter().zip(dr) {
            *d = f16::from_f32(*s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_convert_like_half() {
        // Every f16 (widened), and f32 values around every f16 and its
        // halfway points (rounded), in blocks with a tail past the last 8.
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut wide = vec![0.0f32; all.len()];
        widen(&all, &mut wide);
        for (h, w) in all.iter().zip(&wide) {
            assert!(
                w.to_bits() == h.to_f32().to_bits() || (w.is_nan() && h.is_nan()),
                "{h:?}"
            );
        }
        let mut probes = Vec::new();
        for h in 0..0x7bffu16 {
            let (lo, hi) = (f16::from_bits(h).to_f32(), f16::from_bits(h + 1).to_f32());
            let mid = 0.5 * (lo + hi);
            probes.extend([lo, mid, mid.next_down(), mid.next_up(), -mid, 65520.0, 1e-9]);
        }
        probes.extend([f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, -0.0, 3.0]);
        let mut narrowed = vec![f16::ZERO; probes.len()];
        narrow(&probes, &mut narrowed);
        for (v, h) in probes.iter().zip(&narrowed) {
            let want = f16::from_f32(*v);
            assert!(
                h.to_bits() == want.to_bits() || (v.is_nan() && h.is_nan()),
                "{v:e}: {h:?} vs {want:?}"
            );
        }
    }
}

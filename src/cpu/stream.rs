//! Non-temporal stores for outputs too large to stay in cache: each full,
//! aligned cache line goes to memory without being read first (no
//! read-for-ownership) and without evicting the inputs a pass still reads
//! from cache. On other targets than x86-64, ordinary stores.

/// Bytes of a pass's tensors (inputs and output) from which its `f32`
/// output is streamed: past the 32 MiB L3, the output would not stay in cache.
pub(super) const STREAM_BYTES: usize = 32 << 20;

/// Elements computed into a buffer and streamed at a time (16 cache lines).
const CHUNK: usize = 256;

/// Fills `out` by `f(part, offset)`, which writes elements
/// `offset..offset + part.len()` of the output into `part`: the unaligned
/// ends in place, the 64-byte-aligned middle a [`CHUNK`] at a time into a
/// buffer that is then streamed into `out`. Call [`store_fence`] before
/// another thread may read `out`.
#[inline]
pub(super) fn stream_into(out: &mut [f32], mut f: impl FnMut(&mut [f32], usize)) {
    let n = out.len();
    let head = out.as_ptr().align_offset(64).min(n);
    f(&mut out[..head], 0);
    let mut buf = [0.0f32; CHUNK];
    let mut s = head;
    while s + 16 <= n {
        let len = (CHUNK.min(n - s)) & !15;
        f(&mut buf[..len], s);
        stream_lines(&mut out[s..s + len], &buf[..len]);
        s += len;
    }
    f(&mut out[s..], s);
}

/// `out = v` (lengths a multiple of 16, `out` 64-byte aligned) with
/// non-temporal stores.
#[inline(always)]
fn stream_lines(out: &mut [f32], v: &[f32]) {
    debug_assert!(out.len() == v.len() && out.len().is_multiple_of(16));
    debug_assert!(out.as_ptr().align_offset(64) == 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `out` and `v` hold `out.len()` elements, a multiple of 4, and
    // `out` is 16-byte aligned (checked by the caller's split), as
    // `_mm_stream_ps` needs; SSE is part of x86-64.
    unsafe {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        for q in (0..out.len()).step_by(4) {
            _mm_stream_ps(out.as_mut_ptr().add(q), _mm_loadu_ps(v.as_ptr().add(q)));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    out.copy_from_slice(v);
}

/// Orders this thread's non-temporal stores before what follows (the end
/// of a task, after which other threads read the output).
pub(super) fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_output_is_the_direct_one_at_every_alignment() {
        let x: Vec<f32> = (0..700).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for start in 0..17 {
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 600] {
                let x = &x[start..start + len];
                let kernel = |o: &mut [f32], off: usize| {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = 1.5 * x[off + j] - 0.25;
                    }
                };
                let mut plain = vec![f32::NAN; len];
                kernel(&mut plain, 0);
                // Offsets within a buffer, so the aligned middle moves.
                let mut buf = vec![f32::NAN; len + 16];
                let streamed = &mut buf[start % 16..start % 16 + len];
                stream_into(streamed, kernel);
                store_fence();
                assert_eq!(streamed, &plain[..], "{start} {len}");
            }
        }
    }
}

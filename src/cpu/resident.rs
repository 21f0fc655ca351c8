//! The backward channel by channel with the channel in cache: one task per
//! channel sums `dy` and `dy * (x - centre)` over the channel, turns the
//! sums into the channel's `dx` coefficients, and writes `dx` while `x` and
//! `dy` are still in L2 and L3, so that they come from memory once: 12
//! bytes of traffic per `f32` element (read `x` and `dy`, write `dx`)
//! instead of the 20 of a reduction pass over the whole tensor followed by
//! an elementwise pass.
//!
//! The `dx` pass visits the channel's pieces in reverse order: the pieces
//! read last are the ones still in L2. On tensors too large to stay in
//! cache, `f32` `dx` is written with non-temporal stores, which send each
//! full cache line to memory without reading it first and keep `x` and
//! `dy` in cache.

use super::elem::CpuElement;
use super::grad::Out;
use super::lanes::{Lanes, add_grad};
use super::plan::{Plan, for_each_group, for_each_piece, plan};
use crate::shape::ChannelWalk;
use rayon::prelude::*;

/// Bytes of `x` and `dy` of one channel up to which the backward keeps the
/// channel in cache (L2 is 512 KiB per core here, L3 32 MiB).
pub(super) const RESIDENT_BYTES: usize = 2 << 20;

/// Bytes of `x`, `dy` and `dx` together from which `dx` is written with
/// non-temporal stores: past the 32 MiB L3, `dx` would not stay in cache.
pub(super) const STREAM_BYTES: usize = 32 << 20;

/// Whether the backward of `walk`'s tensor runs channel by channel in
/// cache: a channel-major walk whose channels fit [`RESIDENT_BYTES`], and
/// enough of them for the threads to share.
pub(super) fn fits<E: CpuElement>(walk: &ChannelWalk) -> bool {
    let threads = rayon::current_num_threads().max(1);
    matches!(plan(walk), Plan::Channels { .. })
        && 2 * size_of::<E>() * walk.per_channel() <= RESIDENT_BYTES
        && walk.channels >= 2 * threads
}

/// Per channel: `(sum(dy), sum(dy * (x - center)))` (summed around the
/// `f32` centre and moved to the exact one), then `dx = a dy + b (x - m) + c`
/// with `[m, a, b, c] = coefs(channel, sums)`, in one task per channel.
/// Returns the sums of every channel.
pub(super) fn backward<E: CpuElement>(
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    walk: &ChannelWalk,
    center: &[f64],
    coefs: impl Fn(usize, (f64, f64)) -> [f32; 4] + Sync,
) -> Vec<(f64, f64)> {
    let stream = E::MAPS_IN_PLACE && 3 * size_of::<E>() * walk.len() >= STREAM_BYTES;
    let out = Out::new(dx);
    let m = walk.per_channel();
    (0..walk.channels)
        .into_par_iter()
        .map_init(Vec::new, |pieces, ch| {
            let c32 = center[ch] as f32;
            let (mut t1, mut t2) = (0.0f64, 0.0f64);
            for_each_group(walk, ch, (0, m), pieces, |g| {
                let (mut s1, mut s2) = (Lanes::new(), Lanes::new());
                for &(s, len) in g {
                    add_grad(&mut s1, &mut s2, &x[s..s + len], &dy[s..s + len], c32);
                }
                t1 += s1.total();
                t2 += s2.total();
            });
            let sums = (t1, t2 + (f64::from(c32) - center[ch]) * t1);
            let k = coefs(ch, sums);
            pieces.clear();
            for_each_piece(walk, ch, 0, m, |s, len| pieces.push((s, len)));
            for &(s, len) in pieces.iter().rev() {
                // SAFETY: the pieces of one channel are disjoint, and each
                // channel is one task's.
                let o = unsafe { out.span(s, len) };
                E::map(&[&x[s..s + len], &dy[s..s + len]], o, |_, v, o| {
                    if stream {
                        dx_run::<true>(o, v[0], v[1], k);
                    } else {
                        dx_run::<false>(o, v[0], v[1], k);
                    }
                });
            }
            if stream {
                store_fence();
            }
            sums
        })
        .collect()
}

/// `dx = a dy + b (x - m) + c`; where `b = 0` (running statistics) `x` does
/// not enter, so a NaN in `x` stays out, as in PyTorch's evaluation backward.
/// With `STREAM`, non-temporal stores for the whole cache lines of `dx`.
#[inline(never)]
fn dx_run<const STREAM: bool>(dx: &mut [f32], x: &[f32], dy: &[f32], k: [f32; 4]) {
    if k[2] == 0.0 {
        dx_lanes::<false, STREAM>(dx, x, dy, k);
    } else {
        dx_lanes::<true, STREAM>(dx, x, dy, k);
    }
}

/// The loop of [`dx_run`], with `X` whether `x` enters. With `STREAM`, a
/// chunk of 16 at a time into a local array, stored with non-temporal
/// stores where the 16 elements fill an aligned cache line (ordinary
/// stores at the ends); else a plain loop.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn dx_lanes<const X: bool, const STREAM: bool>(
    dx: &mut [f32],
    x: &[f32],
    dy: &[f32],
    [m, a, b, c]: [f32; 4],
) {
    let n = dx.len();
    let (x, dy) = (&x[..n], &dy[..n]);
    let f = |x: f32, g: f32| {
        if X {
            a * g + b * (x - m) + c
        } else {
            a * g + c
        }
    };
    if !STREAM {
        for j in 0..n {
            dx[j] = f(x[j], dy[j]);
        }
        return;
    }
    let head = (dx.as_ptr().align_offset(64)).min(n);
    for j in 0..head {
        dx[j] = f(x[j], dy[j]);
    }
    let (dxc, dxr) = dx[head..].as_chunks_mut::<16>();
    let (xc, _) = x[head..].as_chunks::<16>();
    let (gc, _) = dy[head..].as_chunks::<16>();
    for ((o, xv), gv) in dxc.iter_mut().zip(xc).zip(gc) {
        let v: [f32; 16] = std::array::from_fn(|l| f(xv[l], gv[l]));
        store_line(o, &v);
    }
    let t = n - dxr.len();
    for (j, o) in dxr.iter_mut().enumerate() {
        *o = f(x[t + j], dy[t + j]);
    }
}

/// `*o = *v`, one 64-byte-aligned cache line, with non-temporal stores.
#[inline(always)]
fn store_line(o: &mut [f32; 16], v: &[f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `o` is 64-byte aligned (its slice starts at an aligned
    // address, chunks of 64 bytes), so each 16-byte store is aligned; SSE
    // is part of x86-64.
    unsafe {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        for q in 0..4 {
            _mm_stream_ps(
                o.as_mut_ptr().add(4 * q),
                _mm_loadu_ps(v.as_ptr().add(4 * q)),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        *o = *v;
    }
}

/// Orders the non-temporal stores of this thread before what follows
/// (the end of the task, which other threads then see).
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    #[test]
    fn streamed_dx_is_the_plain_dx_at_every_alignment() {
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let dy: Vec<f32> = (0..300).map(|i| (i as f32 * 0.11).cos()).collect();
        for k in [[0.25, 1.5, -0.75, 0.125], [0.25, 1.5, 0.0, 0.125]] {
            for start in 0..17 {
                for len in [0, 1, 15, 16, 17, 63, 64, 65, 200] {
                    let (x, dy) = (&x[start..start + len], &dy[start..start + len]);
                    let mut plain = vec![f32::NAN; len];
                    // Offsets within a buffer, so the aligned middle moves.
                    let mut buf = vec![f32::NAN; len + 16];
                    let streamed = &mut buf[start % 16..start % 16 + len];
                    dx_run::<false>(&mut plain, x, dy, k);
                    dx_run::<true>(streamed, x, dy, k);
                    store_fence();
                    let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(streamed), bits(&plain), "{k:?} {start} {len}");
                    let want = |j: usize| k[1] * dy[j] + k[2] * (x[j] - k[0]) + k[3];
                    assert!((0..len).all(|j| k[2] == 0.0 || plain[j] == want(j)));
                }
            }
        }
    }

    #[test]
    fn channel_major_walks_with_small_channels_fit() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let walk = |d: &[usize], l| ChannelWalk::new(d, l).unwrap();
            let first = Layout::ChannelsFirst;
            // 32x64x56x56: 784 KiB of x and dy a channel.
            assert!(fits::<f32>(&walk(&[32, 64, 56, 56], first)));
            // 32x64x128x128: 4 MiB a channel, f16 2 MiB.
            assert!(!fits::<f32>(&walk(&[32, 64, 128, 128], first)));
            assert!(fits::<half::f16>(&walk(&[32, 64, 128, 128], first)));
            // Too few channels for the threads; other walks.
            assert!(!fits::<f32>(&walk(&[8, 3, 32, 32], first)));
            assert!(!fits::<f32>(&walk(&[32, 2048, 7, 7], first)));
            assert!(!fits::<f32>(&walk(&[8, 32, 32, 64], Layout::ChannelsLast)));
        });
    }
}

//! The training forward and the backward channel by channel with the
//! channel in cache: one task per channel reduces it (moments of `x`, or
//! sums of `dy` and `dy * (x - centre)`), turns the result into the
//! channel's coefficients, and writes `y` or `dx` while the inputs are
//! still in L2 and L3, so that they come from memory once: per `f32`
//! element 8 bytes of traffic for the forward instead of 12, 12 for the
//! backward instead of 20.
//!
//! The elementwise part visits the channel's pieces in reverse order: the
//! pieces read last are the ones still in L2. Measured on 2 cores of an AMD
//! EPYC against the reduction pass followed by the elementwise pass, in one
//! process, call by call: training forward 1.06-1.10x (32x64x56x56) and
//! 1.20-1.22x (32x256x56x56), backward 1.16-1.19x and 1.27-1.32x.
//! Non-temporal stores of the output made both slower (0.69-1.03x), and
//! blocks of channels with short runs (7x7 to 28x28) in cache did not pay
//! (0.80-1.01x, 1.05-1.29x for the backward at 28x28 only).

use super::elem::CpuElement;
use super::elementwise::Epilogue;
use super::grad::Out;
use super::kernels::dx_run;
use super::kernels::normalize_seg;
use super::lanes::{Lanes, add_grad};
use super::plan::{Plan, for_each_group, for_each_piece, plan};
use super::reduce::{group_moments, non_finite_channel};
use crate::shape::ChannelWalk;
use crate::stats::Moments;
use rayon::prelude::*;

/// Bytes of the inputs of one channel up to which a pass keeps the channel
/// in cache (L2 is 512 KiB per core here, L3 32 MiB).
pub(super) const RESIDENT_BYTES: usize = 2 << 20;

/// Whether a pass reading `inputs` tensors of `walk`'s shape runs channel
/// by channel in cache: a channel-major walk whose channels' inputs fit
/// [`RESIDENT_BYTES`], and enough channels for the threads to share.
pub(super) fn fits<E: CpuElement>(walk: &ChannelWalk, inputs: usize) -> bool {
    let threads = rayon::current_num_threads().max(1);
    matches!(plan(walk), Plan::Channels { .. })
        && inputs * size_of::<E>() * walk.per_channel() <= RESIDENT_BYTES
        && walk.channels >= 2 * threads
}

/// Runs `task(channel, pieces)` for every channel in parallel, `pieces` a
/// scratch vector, and collects the results in channel order.
fn per_channel<R: Send>(
    walk: &ChannelWalk,
    task: impl Fn(usize, &mut Vec<(usize, usize)>) -> R + Sync + Send,
) -> Vec<R> {
    (0..walk.channels)
        .into_par_iter()
        .map_init(Vec::new, |pieces, ch| task(ch, pieces))
        .collect()
}

/// The pieces of channel `ch` into `pieces`, in memory order.
fn pieces_of(walk: &ChannelWalk, ch: usize, pieces: &mut Vec<(usize, usize)>) {
    pieces.clear();
    for_each_piece(walk, ch, 0, walk.per_channel(), |s, len| {
        pieces.push((s, len));
    });
}

/// Training forward: per channel, the moments of `x` (as
/// [`super::reduce::channel_moments`], with PyTorch's statistics for a
/// channel holding `±inf` or NaN), then `y = act((x - c) s + b + z)` with
/// `[c, s, b] = coefs(channel, moments)` and the epilogue `epi`. Returns
/// the moments of every channel.
pub(super) fn forward<E: CpuElement>(
    x: &[E],
    y: &mut [E],
    walk: &ChannelWalk,
    epi: Epilogue<'_, E>,
    coefs: impl Fn(usize, Moments) -> [f32; 3] + Sync,
) -> Vec<Moments> {
    let act = epi.activation;
    let out = Out::new(y);
    let m = walk.per_channel();
    per_channel(walk, |ch, pieces| {
        let mut acc = Moments::default();
        for_each_group(walk, ch, (0, m), pieces, |g| {
            let shift = (acc.n > 0.0).then_some(acc.mean as f32);
            acc = acc.merge(group_moments(x, g, shift));
        });
        non_finite_channel(x, walk, ch, &mut acc);
        let k = coefs(ch, acc);
        pieces_of(walk, ch, pieces);
        for &(s, len) in pieces.iter().rev() {
            // SAFETY: the pieces of one channel are disjoint, and each
            // channel is one task's.
            let o = unsafe { out.span(s, len) };
            let x = &x[s..s + len];
            let z = epi.z.map(|z| &z[s..s + len]);
            let ins: &[&[E]] = match &z {
                Some(z) => &[x, z],
                None => &[x],
            };
            E::map(ins, o, |_, v, o| normalize_seg(o, v, k, act));
        }
        acc
    })
}

/// Backward: per channel, `(sum(dy), sum(dy * (x - center)))` (summed
/// around the `f32` centre and moved to the exact one), then
/// `dx = a dy + b (x - m) + c` with `[m, a, b, c] = coefs(channel, sums)`.
/// Returns the sums of every channel.
pub(super) fn backward<E: CpuElement>(
    x: &[E],
    dy: &[E],
    dx: &mut [E],
    walk: &ChannelWalk,
    center: &[f64],
    coefs: impl Fn(usize, (f64, f64)) -> [f32; 4] + Sync,
) -> Vec<(f64, f64)> {
    let out = Out::new(dx);
    let m = walk.per_channel();
    per_channel(walk, |ch, pieces| {
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
        pieces_of(walk, ch, pieces);
        for &(s, len) in pieces.iter().rev() {
            // SAFETY: the pieces of one channel are disjoint, and each
            // channel is one task's.
            let o = unsafe { out.span(s, len) };
            E::map(&[&x[s..s + len], &dy[s..s + len]], o, |_, v, o| {
                dx_run(o, v[0], v[1], k);
            });
        }
        sums
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

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
            assert!(fits::<f32>(&walk(&[32, 64, 56, 56], first), 2));
            // 32x64x128x128: 4 MiB a channel, f16 2 MiB; x alone 2 MiB.
            assert!(!fits::<f32>(&walk(&[32, 64, 128, 128], first), 2));
            assert!(fits::<half::f16>(&walk(&[32, 64, 128, 128], first), 2));
            assert!(fits::<f32>(&walk(&[32, 64, 128, 128], first), 1));
            // Too few channels for the threads; other walks.
            assert!(!fits::<f32>(&walk(&[8, 3, 32, 32], first), 2));
            assert!(!fits::<f32>(&walk(&[32, 2048, 7, 7], first), 2));
            assert!(!fits::<f32>(
                &walk(&[8, 32, 32, 64], Layout::ChannelsLast),
                2
            ));
        });
    }
}

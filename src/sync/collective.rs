//! The collective a synchronized BatchNorm exchanges its per-channel
//! statistics through: the [`Collective`] trait.

use crate::error::{Error, Result};

/// The collective operations a synchronized BatchNorm needs, over `size`
/// participants (ranks) numbered `0..size`: implement it for NCCL, gloo or
/// any transport already in use; [`super::InProcessCollective`] and (feature
/// `mpi`) `MpiCollective` ship with the crate.
///
/// Only `f64` slices travel: the statistics are merged in `f64`, and a GPU
/// backend's `f32` partials are widened before they are sent.
///
/// Every participant calls the same operations in the same order, with
/// slices of the same length. An error of the transport comes back as an
/// `Err` ([`Error::Collective`] suits it); the synchronized BatchNorm then
/// returns it and changes no state.
pub trait Collective {
    /// This participant's rank, in `0..size()`.
    fn rank(&self) -> usize;

    /// The number of participants.
    fn size(&self) -> usize;

    /// All-gather: writes every participant's `local`, in rank order, into
    /// `out` (`size() * local.len()` values). Every participant passes a
    /// `local` of the same length.
    ///
    /// # Errors
    /// The transport's error; a length that differs between participants or
    /// an `out` of the wrong length.
    fn all_gather_f64(&self, local: &[f64], out: &mut [f64]) -> Result<()>;

    /// All-reduce with SUM, in place: afterwards `buf[i]` holds the sum over
    /// participants of their `buf[i]`, and every participant holds the same
    /// bits.
    ///
    /// The default implementation all-gathers and adds in rank order, which
    /// gives every participant the same bits by construction; a native
    /// all-reduce that overrides it must give the same bits on every
    /// participant too (for example a fixed reduction tree).
    ///
    /// # Errors
    /// As [`Collective::all_gather_f64`].
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let n = buf.len();
        let mut all = vec![0.0; n * self.size()];
        self.all_gather_f64(buf, &mut all)?;
        buf.fill(0.0);
        for part in all.chunks_exact(n.max(1)).take(self.size()) {
            for (b, &v) in buf.iter_mut().zip(part) {
                *b += v;
            }
        }
        Ok(())
    }
}

/// The error of an all-gather whose `out` does not hold `size * local` values.
pub(crate) fn check_gather_len(
    op: &'static str,
    rank: usize,
    size: usize,
    local: usize,
    out: usize,
) -> Result<()> {
    if out != size * local {
        return Err(Error::Collective {
            op,
            rank,
            message: format!(
                "the output holds {out} values, expected {size} ranks x {local} values = {}",
                size * local
            ),
        });
    }
    Ok(())
}

//! [`MpiCollective`]: the exchange of a synchronized BatchNorm over MPI
//! (rsmpi and the system's MPI library; feature `mpi`).

use super::collective::{Collective, check_gather_len};
use crate::error::{Error, Result};
use mpi::traits::{Communicator, CommunicatorCollectives};

/// A [`Collective`] over an MPI communicator: one process per rank, started
/// by `mpirun`.
///
/// Before each all-gather the ranks all-gather their slice lengths (two
/// integers each), so that a rank with a different length, or a wrong
/// output slice, makes every rank return [`Error::Collective`] instead of
/// corrupting memory or waiting forever.
///
/// A rank that dies (a crash, a kill) is MPI's to handle: with the default
/// error handler (`MPI_ERRORS_ARE_FATAL`), `mpirun` ends every rank of the
/// job, so no rank goes on with statistics the others did not see.
///
/// ```no_run
/// use wgpu_batchnorm::sync::{Collective, MpiCollective};
/// let universe = mpi::initialize().expect("MPI initialized once");
/// let comm = MpiCollective::new(universe.world());
/// let mut v = [comm.rank() as f64];
/// comm.all_reduce_sum_f64(&mut v)?;
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct MpiCollective<C> {
    comm: C,
}

impl<C: Communicator> MpiCollective<C> {
    /// A collective over the ranks of `comm` (for example `universe.world()`).
    pub fn new(comm: C) -> Self {
        Self { comm }
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }
}

impl<C: Communicator> Collective for MpiCollective<C> {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_gather_f64(&self, local: &[f64], out: &mut [f64]) -> Result<()> {
        let size = self.size();
        // Lengths first: MPI_Allgather needs the same count on every rank.
        let mine = [
            local.len() as u64,
            u64::from(out.len() == size * local.len()),
        ];
        let mut lens = vec![0u64; 2 * size];
        self.comm.all_gather_into(&mine[..], &mut lens[..]);
        let sent: Vec<u64> = lens.chunks_exact(2).map(|p| p[0]).collect();
        if sent.iter().any(|&n| n != sent[0]) {
            return Err(Error::Collective {
                op: "all_gather_f64",
                rank: self.rank(),
                message: format!(
                    "the ranks sent slices of different lengths {sent:?} (rank order)"
                ),
            });
        }
        if let Some(r) = lens.chunks_exact(2).position(|p| p[1] == 0) {
            check_gather_len("all_gather_f64", self.rank(), size, local.len(), out.len())?;
            return Err(Error::Collective {
                op: "all_gather_f64",
                rank: self.rank(),
                message: format!("rank {r} passed an output slice of the wrong length"),
            });
        }
        self.comm.all_gather_into(local, out);
        Ok(())
    }
}

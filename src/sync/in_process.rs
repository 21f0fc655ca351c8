//! [`InProcessCollective`]: several participants in one process (threads,
//! each with its own backend), meeting in shared memory.

use super::collective::{Collective, check_gather_len};
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One participant of a group of collectives in one process: give each
/// thread its own (they are `Send`), and every thread's calls meet the
/// others' calls of the same round.
///
/// When a participant is dropped (its thread returned or panicked), every
/// collective call of the others, waiting or later, returns
/// [`Error::Collective`] naming it, instead of waiting forever.
///
/// ```
/// use wgpu_batchnorm::sync::{Collective, InProcessCollective};
/// let group = InProcessCollective::group(3);
/// let sums: Vec<f64> = std::thread::scope(|s| {
///     let handles: Vec<_> = group
///         .into_iter()
///         .map(|c| s.spawn(move || {
///             let mut v = [c.rank() as f64 + 1.0];
///             c.all_reduce_sum_f64(&mut v).unwrap();
///             v[0]
///         }))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(sums, [6.0, 6.0, 6.0]);
/// ```
#[derive(Debug)]
pub struct InProcessCollective {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// The all-gather in progress, and the result of the last one.
#[derive(Debug, Default)]
struct Round {
    /// Counts completed all-gathers.
    generation: u64,
    /// What each participant sent in the current round.
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// The concatenation of the last round, or why it failed.
    result: Option<std::result::Result<Arc<Vec<f64>>, String>>,
    /// The first participant that was dropped.
    left: Option<usize>,
}

impl InProcessCollective {
    /// A group of `size` participants, ranks `0..size` in order.
    ///
    /// # Panics
    /// When `size` is 0.
    pub fn group(size: usize) -> Vec<InProcessCollective> {
        assert!(size > 0, "a group needs at least one participant");
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                slots: vec![None; size],
                ..Round::default()
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| InProcessCollective {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A participant that panicked holds no invariant half-done: keep going.
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, message: String) -> Error {
        Error::Collective {
            op: "all_gather_f64",
            rank: self.rank,
            message,
        }
    }
}

fn left_message(rank: usize) -> String {
    format!("in-process participant {rank} left the group (dropped, or its thread ended)")
}

impl Collective for InProcessCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather_f64(&self, local: &[f64], out: &mut [f64]) -> Result<()> {
        let size = self.shared.size;
        let mut round = self.lock();
        if let Some(r) = round.left {
            return Err(self.error(left_message(r)));
        }
        // Join the round even when `out` is wrong, so that the rounds of the
        // others stay aligned; the length is checked after.
        round.slots[self.rank] = Some(local.to_vec());
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == size {
            let parts: Vec<Vec<f64>> = round.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            let len = parts[0].len();
            round.result = Some(if parts.iter().all(|p| p.len() == len) {
                Ok(Arc::new(parts.concat()))
            } else {
                let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
                Err(format!(
                    "the ranks sent slices of different lengths {lens:?} (rank order)"
                ))
            });
            round.arrived = 0;
            round.generation += 1;
            self.shared.changed.notify_all();
        } else {
            while round.generation == generation && round.left.is_none() {
                round = self
                    .shared
                    .changed
                    .wait(round)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if round.generation == generation {
                let r = round.left.expect("woken by a participant leaving");
                return Err(self.error(left_message(r)));
            }
        }
        // No later round can complete before this participant joins it, so
        // the result is still this round's.
        let all = match round.result.as_ref().expect("set by the last to arrive") {
            Ok(all) => Arc::clone(all),
            Err(message) => return Err(self.error(message.clone())),
        };
        drop(round);
        check_gather_len("all_gather_f64", self.rank, size, local.len(), out.len())?;
        out.copy_from_slice(&all);
        Ok(())
    }
}

impl Drop for InProcessCollective {
    fn drop(&mut self) {
        let mut round = self.lock();
        round.left.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

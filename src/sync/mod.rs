//! Synchronized BatchNorm: data-parallel training where every rank (device,
//! process) holds part of the batch and normalizes with the statistics of
//! the whole batch, as PyTorch's `SyncBatchNorm` does.
//!
//! A synchronized step runs in three phases; only the middle one talks to
//! the other ranks, through a [`Collective`]:
//!
//! ```text
//! forward   local  (count, mean, M2) per channel of this rank's part     SyncPhases::local_moments
//!                  (the count may differ between ranks, and may be 0)
//!           merge  all-gather, then Chan's formula in rank order:         merge_moments
//!                  every rank computes the same bits
//!           apply  normalize with the merged statistics; running          SyncPhases::apply_moments
//!                  statistics with the global count M (unbiased: M-1)
//! backward  local  (sum_dy, sum_dy_xmu) per channel                       SyncPhases::local_grad_sums
//!           merge  all-reduce SUM
//!           apply  dx with the global count; dweight = sum_dy_xmu invstd,  SyncPhases::apply_grad_sums
//!                  dbias = sum_dy, summed over all ranks
//! ```
//!
//! [`forward_train`] and [`backward`] run the phases on any backend that
//! implements [`SyncPhases`] (the CPU reference and the fast CPU backend
//! do); a backend that keeps its tensors on a device implements the two
//! local phases with its own tensors and exchanges only the per-channel host
//! values shown here.
//!
//! What travels, per layer and per channel: the forward all-gathers
//! `(count, mean, M2)` as three `f64` (24 bytes from each rank, `24 P` bytes
//! received by each of `P` ranks), the backward all-reduces `(sum_dy,
//! sum_dy_xmu)` as two `f64` (16 bytes); each exchange adds one `f64` that
//! says whether every rank's local phase succeeded. `M2` travels rather than
//! `invstd`, whose round trip through `1 / sqrt(var + eps)` loses precision.
//!
//! Gradients: `dx` is this rank's part of the gradient of the whole batch;
//! `dweight` and `dbias` are those of the whole batch, the same on every
//! rank (PyTorch's `SyncBatchNorm` returns the local ones and leaves the sum
//! to DistributedDataParallel: do not sum them again).
//!
//! Errors: a rank whose input is refused (wrong shape, channels) still
//! takes part in the exchange and marks its contribution as failed, so
//! every rank returns an `Err` and no rank changes state. A failing
//! transport returns its `Err` the same way. A backend whose apply phase
//! fails after the exchange (a GPU device loss) leaves its own state
//! unchanged while the other ranks move on.
//!
//! ```
//! use ndarray::{Array, IxDyn};
//! use wgpu_batchnorm::sync::{self, InProcessCollective};
//! use wgpu_batchnorm::{BatchNormConfig, CpuBatchNorm};
//!
//! // Two ranks in one process, each with its own layer and part of the batch.
//! let parts = [3usize, 5];
//! let y: Vec<_> = std::thread::scope(|s| {
//!     let handles: Vec<_> = InProcessCollective::group(2)
//!         .into_iter()
//!         .zip(parts)
//!         .map(|(comm, n)| s.spawn(move || {
//!             let mut bn = CpuBatchNorm::new(BatchNormConfig::new(4)).unwrap();
//!             let x = Array::from_shape_fn(IxDyn(&[n, 4, 6]), |i| (i[0] * 7 + i[1] + i[2] * 3) as f32);
//!             let y = sync::forward_train(&mut bn, &comm, x.view())?;
//!             let grads = sync::backward(&mut bn, &comm, x.view(), y.view())?;
//!             Ok::<_, wgpu_batchnorm::Error>((y, grads.dbias.unwrap()))
//!         }))
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
//! });
//! assert_eq!(y[0].1, y[1].1); // dbias of the whole batch on both ranks
//! ```

mod collective;
mod in_process;
#[cfg(feature = "mpi")]
mod mpi_collective;

pub use collective::Collective;
pub use in_process::InProcessCollective;
#[cfg(feature = "mpi")]
pub use mpi_collective::MpiCollective;

use crate::config::BatchNormConfig;
use crate::error::{Error, Result};
use crate::shape::ChannelWalk;
use crate::stats::Moments;

/// The phases of a synchronized step that run on a backend, without the
/// exchange: what a backend implements to take part in [`forward_train`]
/// and [`backward`].
///
/// Per-channel values cross this interface as host slices in `f64`; the
/// tensors stay in the backend's own type ([`SyncPhases::Tensor`]).
pub trait SyncPhases {
    /// A tensor of this backend: an ndarray view on the CPU backends.
    type Tensor<'a>;
    /// What the training forward returns (`y`).
    type Output;
    /// What the backward returns (`dx`, `dweight`, `dbias`).
    type Grads;

    /// The layer's configuration.
    fn sync_config(&self) -> &BatchNormConfig;

    /// Forward, phase 1: checks this rank's part `x` (zero samples allowed)
    /// and returns `(count, mean, M2)` of each channel. Changes nothing.
    ///
    /// # Errors
    /// Shape and channel errors.
    fn local_moments(&mut self, x: &Self::Tensor<'_>) -> Result<Vec<Moments>>;

    /// Forward, phase 3: normalizes `x` with the merged statistics `global`
    /// of the whole batch, keeps them for [`SyncPhases::local_grad_sums`],
    /// and updates the running statistics with the global count.
    ///
    /// # Errors
    /// [`Error::SingleValueAcrossRanks`] when the whole batch holds one value
    /// per channel; shape errors. Nothing changes on error.
    fn apply_moments(&mut self, x: &Self::Tensor<'_>, global: &[Moments]) -> Result<Self::Output>;

    /// Backward, phase 1: `(sum_dy, sum_dy_xmu)` of each channel of this
    /// rank's part, around the mean saved by the synchronized forward.
    ///
    /// # Errors
    /// Shape errors; [`Error::NoSavedStatistics`] when the last forward on
    /// this shape was not a synchronized one.
    fn local_grad_sums(
        &mut self,
        x: &Self::Tensor<'_>,
        dy: &Self::Tensor<'_>,
    ) -> Result<Vec<(f64, f64)>>;

    /// Backward, phase 3: `dx` of this rank's part from the sums `global`
    /// over all ranks and the global count; `dweight`, `dbias` from `global`.
    ///
    /// # Errors
    /// As [`SyncPhases::local_grad_sums`].
    fn apply_grad_sums(
        &mut self,
        x: &Self::Tensor<'_>,
        dy: &Self::Tensor<'_>,
        global: &[(f64, f64)],
    ) -> Result<Self::Grads>;
}

/// Synchronized training forward of this rank's part `x`: the three phases,
/// with the exchange through `comm`. Every rank calls it with its own part.
///
/// # Errors
/// This rank's input errors, [`Error::Collective`] when the transport failed
/// or another rank's input was refused, [`Error::SingleValueAcrossRanks`].
/// On error the layer is unchanged, on every rank.
pub fn forward_train<B, C>(bn: &mut B, comm: &C, x: B::Tensor<'_>) -> Result<B::Output>
where
    B: SyncPhases + ?Sized,
    C: Collective + ?Sized,
{
    let channels = bn.sync_config().num_features;
    let local = bn.local_moments(&x);
    let global = merge_moments(comm, local.as_deref().ok(), channels);
    let global = match (local, global) {
        (Err(e), _) => return Err(e),
        (Ok(_), global) => global?,
    };
    bn.apply_moments(&x, &global)
}

/// Synchronized backward of this rank's part of the last synchronized
/// forward, at input `x` with upstream gradient `dy`.
///
/// # Errors
/// As [`forward_train`], and [`Error::NoSavedStatistics`].
pub fn backward<B, C>(bn: &mut B, comm: &C, x: B::Tensor<'_>, dy: B::Tensor<'_>) -> Result<B::Grads>
where
    B: SyncPhases + ?Sized,
    C: Collective + ?Sized,
{
    let channels = bn.sync_config().num_features;
    let local = bn.local_grad_sums(&x, &dy);
    let global = sum_grad_sums(comm, local.as_deref().ok(), channels);
    let global = match (local, global) {
        (Err(e), _) => return Err(e),
        (Ok(_), global) => global?,
    };
    bn.apply_grad_sums(&x, &dy, &global)
}

/// Chan's merge of the ranks' partials, in rank order: `parts[r][c]` is
/// rank `r`'s `(count, mean, M2)` of channel `c`. Parts with count 0 drop
/// out; the result is the same bits for the same parts in the same order.
///
/// ```text
/// d = mean_b - mean_a,  n = n_a + n_b
/// mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n
/// ```
pub fn merge_partials<P: AsRef<[Moments]>>(parts: &[P], channels: usize) -> Vec<Moments> {
    (0..channels)
        .map(|c| {
            parts
                .iter()
                .fold(Moments::default(), |acc, p| acc.merge(p.as_ref()[c]))
        })
        .collect()
}

/// Forward, phase 2: all-gathers every rank's `local` moments through
/// `comm` and merges them with [`merge_partials`]. A rank whose local phase
/// failed passes `None` and still takes part, so that every rank returns
/// the error.
///
/// # Errors
/// [`Error::Collective`] when the transport failed or a rank's local phase
/// failed; the length of `local` must be `channels`.
pub fn merge_moments<C: Collective + ?Sized>(
    comm: &C,
    local: Option<&[Moments]>,
    channels: usize,
) -> Result<Vec<Moments>> {
    // [failed, count.., mean.., M2..]
    let width = 1 + 3 * channels;
    let mut send = vec![0.0; width];
    match local {
        Some(m) if m.len() == channels => {
            for (c, mo) in m.iter().enumerate() {
                send[1 + c] = mo.n;
                send[1 + channels + c] = mo.mean;
                send[1 + 2 * channels + c] = mo.m2;
            }
        }
        _ => send[0] = 1.0,
    }
    let mut all = vec![0.0; width * comm.size()];
    comm.all_gather_f64(&send, &mut all)?;
    let rows: Vec<&[f64]> = all.chunks_exact(width).collect();
    if let Some(r) = rows.iter().position(|row| row[0] != 0.0) {
        return Err(peer_failed(comm, "all_gather_f64", r));
    }
    let parts: Vec<Vec<Moments>> = rows
        .iter()
        .map(|row| {
            (0..channels)
                .map(|c| Moments {
                    n: row[1 + c],
                    mean: row[1 + channels + c],
                    m2: row[1 + 2 * channels + c],
                })
                .collect()
        })
        .collect();
    Ok(merge_partials(&parts, channels))
}

/// Backward, phase 2: the SUM all-reduce of every rank's `(sum_dy,
/// sum_dy_xmu)` through `comm`; `None` as in [`merge_moments`].
///
/// # Errors
/// As [`merge_moments`].
pub fn sum_grad_sums<C: Collective + ?Sized>(
    comm: &C,
    local: Option<&[(f64, f64)]>,
    channels: usize,
) -> Result<Vec<(f64, f64)>> {
    // [failed ranks, sum_dy.., sum_dy_xmu..]
    let mut buf = vec![0.0; 1 + 2 * channels];
    match local {
        Some(s) if s.len() == channels => {
            for (c, &(s1, s2)) in s.iter().enumerate() {
                buf[1 + c] = s1;
                buf[1 + channels + c] = s2;
            }
        }
        _ => buf[0] = 1.0,
    }
    comm.all_reduce_sum_f64(&mut buf)?;
    if buf[0] != 0.0 {
        let message = format!("{} rank(s) failed their local backward phase", buf[0]);
        return Err(Error::Collective {
            op: "all_reduce_sum_f64",
            rank: comm.rank(),
            message,
        });
    }
    Ok((0..channels)
        .map(|c| (buf[1 + c], buf[1 + channels + c]))
        .collect())
}

fn peer_failed<C: Collective + ?Sized>(comm: &C, op: &'static str, r: usize) -> Error {
    Error::Collective {
        op,
        rank: comm.rank(),
        message: format!("rank {r} failed its local phase (its input was refused)"),
    }
}

/// How a plain backward after a synchronized forward is refused.
pub(crate) const SYNCED_FORWARD: &str =
    " (the last forward was synchronized across ranks: its backward is sync::backward)";

/// How a synchronized backward after a plain forward is refused.
pub(crate) const NOT_SYNCED: &str =
    " (the last forward was not synchronized: its backward is the backend's own)";

/// The walk of a rank's part of shape `dims`, which may hold zero samples:
/// `None` for an empty part (after the rank, layout and channel checks).
///
/// # Errors
/// [`Error::Rank`], [`Error::ChannelMismatch`], [`Error::TooLarge`].
pub(crate) fn part_walk(config: &BatchNormConfig, dims: &[usize]) -> Result<Option<ChannelWalk>> {
    if !dims.contains(&0) {
        return ChannelWalk::for_features(dims, config.layout, config.num_features).map(Some);
    }
    // Check rank and channels on the shape with its empty axes as 1, then
    // the channel axis itself.
    let ones: Vec<usize> = dims.iter().map(|&d| d.max(1)).collect();
    let walk = ChannelWalk::for_features(&ones, config.layout, config.num_features)?;
    let channel_axis = match config.layout {
        crate::layout::Layout::ChannelsFirst => 1,
        crate::layout::Layout::ChannelsLast => dims.len() - 1,
    };
    if dims[channel_axis] != walk.channels {
        return Err(Error::ChannelMismatch {
            expected: config.num_features,
            got: dims[channel_axis],
            shape: dims.to_vec(),
            layout: config.layout,
        });
    }
    Ok(None)
}

/// The global count per channel of the merged statistics, checked: a
/// training step needs more than one value per channel in the whole batch.
///
/// # Errors
/// [`Error::SingleValueAcrossRanks`]; [`Error::ShapeMismatch`] when `global`
/// does not hold `channels` channels.
pub(crate) fn global_count(global: &[Moments], channels: usize) -> Result<usize> {
    crate::validate::channel_len("merged statistics", global.len(), channels)?;
    let n = global.first().map_or(0.0, |m| m.n);
    if n < 2.0 {
        return Err(Error::SingleValueAcrossRanks { count: n as u64 });
    }
    Ok(n as usize)
}

/// The checked part of a synchronized backward on a CPU backend: the walk of
/// the part (`None` for zero samples), the saved `(mean, invstd)` and the
/// global count.
pub(crate) type SyncedBackward = (Option<ChannelWalk>, Vec<f64>, Vec<f64>, usize);

/// Checks `x` and `dy` (shapes `x`, `dy`) of a synchronized backward against
/// what the synchronized forward saved (`saved`, and the global count
/// `sync_count`, `None` when the last forward was not synchronized).
///
/// # Errors
/// As [`part_walk`]; [`Error::ShapeMismatch`] for `dy`;
/// [`Error::NoSavedStatistics`].
pub(crate) fn synced_backward(
    config: &BatchNormConfig,
    state: &crate::state::BatchNormState,
    saved: Option<&crate::state::SavedBatchStats>,
    sync_count: Option<usize>,
    (x, dy): (&[usize], &[usize]),
) -> Result<SyncedBackward> {
    let walk = part_walk(config, x)?;
    crate::validate::same_shape("dy", x, dy)?;
    let (center, invstd) = crate::stats::backward_stats(config, state, saved, x, true)?;
    let m = sync_count.ok_or_else(|| Error::NoSavedStatistics {
        detail: NOT_SYNCED.into(),
    })?;
    Ok((walk, center, invstd, m))
}

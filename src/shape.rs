//! From a shape and a layout to "how to walk a channel".
//!
//! Every supported layout is described by three numbers: element `(o, c, i)`
//! of channel `c` lies at flat index `(o * channels + c) * inner + i`, with
//! `o < outer` and `i < inner`. Channels-first `(N,C,*S)` has `outer = N`,
//! `inner = prod(S)`; channels-last `(N,*S,C)` has `outer = N*prod(S)`,
//! `inner = 1`. The shaders and the CPU paths take this description and
//! nothing else, so one kernel serves both layouts.

use crate::error::{Error, Result};
use crate::layout::Layout;

/// The walk of a contiguous tensor's channels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelWalk {
    /// Shape as given.
    pub dims: Vec<usize>,
    /// Layout as given.
    pub layout: Layout,
    /// Number of channels `C`.
    pub channels: usize,
    /// Runs of a channel: `N` (channels-first) or `N*spatial` (channels-last).
    pub outer: usize,
    /// Contiguous elements per run: spatial size (channels-first) or 1 (channels-last).
    pub inner: usize,
}

impl ChannelWalk {
    /// Describes `dims` in `layout`.
    ///
    /// # Errors
    /// [`Error::Rank`] for a rank outside 2..=5 (3..=5 channels-last), [`Error::Empty`]
    /// when a dimension is 0, [`Error::TooLarge`] when the element count passes `u32::MAX`.
    pub fn new(dims: &[usize], layout: Layout) -> Result<Self> {
        let rank = dims.len();
        let min_rank = match layout {
            Layout::ChannelsFirst => 2,
            Layout::ChannelsLast => 3,
        };
        if !(min_rank..=5).contains(&rank) {
            return Err(Error::Rank {
                shape: dims.to_vec(),
                rank,
                min_rank,
                layout,
            });
        }
        if dims.contains(&0) {
            return Err(Error::Empty {
                shape: dims.to_vec(),
            });
        }
        let len = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or_else(|| Error::TooLarge {
                what: format!("tensor of shape {dims:?}"),
                bytes: dims
                    .iter()
                    .map(|&d| d as u64)
                    .product::<u64>()
                    .saturating_mul(4),
                limit_name: "u32 element indexing",
                limit: u32::MAX as u64,
            })?;
        let (channels, outer, inner) = match layout {
            Layout::ChannelsFirst => (dims[1], dims[0], dims[2..].iter().product()),
            Layout::ChannelsLast => (dims[rank - 1], dims[..rank - 1].iter().product(), 1),
        };
        debug_assert_eq!(outer * channels * inner, len);
        Ok(Self {
            dims: dims.to_vec(),
            layout,
            channels,
            outer,
            inner,
        })
    }

    /// Describes `dims` in `layout` and checks the channel count.
    ///
    /// # Errors
    /// As [`ChannelWalk::new`], and [`Error::ChannelMismatch`].
    pub fn for_features(dims: &[usize], layout: Layout, num_features: usize) -> Result<Self> {
        let walk = Self::new(dims, layout)?;
        if walk.channels != num_features {
            return Err(Error::ChannelMismatch {
                expected: num_features,
                got: walk.channels,
                shape: dims.to_vec(),
                layout,
            });
        }
        Ok(walk)
    }

    /// Elements per channel, `M`.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }

    /// Total elements.
    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    /// Always false: a walk is never built for an empty tensor.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Flat index of element `m` (0..M) of channel `c`.
    #[inline]
    pub fn index(&self, c: usize, m: usize) -> usize {
        let (o, i) = (m / self.inner, m % self.inner);
        (o * self.channels + c) * self.inner + i
    }

    /// Channel of flat index `idx`.
    #[inline]
    pub fn channel_of(&self, idx: usize) -> usize {
        (idx / self.inner) % self.channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_first_and_last_index_the_same_logical_element() {
        let first = ChannelWalk::new(&[2, 3, 4, 5], Layout::ChannelsFirst).unwrap();
        assert_eq!((first.channels, first.outer, first.inner), (3, 2, 20));
        // element n=1, c=2, h=3, w=4 -> m = 1*20 + 3*5 + 4
        assert_eq!(first.index(2, 20 + 19), ((3 + 2) * 4 + 3) * 5 + 4);
        let last = ChannelWalk::new(&[2, 4, 5, 3], Layout::ChannelsLast).unwrap();
        assert_eq!((last.channels, last.outer, last.inner), (3, 40, 1));
        assert_eq!(last.index(2, 39), 39 * 3 + 2);
        assert_eq!(last.channel_of(39 * 3 + 2), 2);
    }

    #[test]
    fn bad_shapes_are_named() {
        let e = ChannelWalk::new(&[4], Layout::ChannelsFirst).unwrap_err();
        assert!(e.to_string().contains("rank 2 to 5"), "{e}");
        let e = ChannelWalk::new(&[2, 3], Layout::ChannelsLast).unwrap_err();
        assert!(e.to_string().contains("rank 3 to 5"), "{e}");
        let e = ChannelWalk::new(&[2, 0, 3], Layout::ChannelsFirst).unwrap_err();
        assert!(matches!(e, Error::Empty { .. }));
        let e = ChannelWalk::for_features(&[2, 3], Layout::ChannelsFirst, 4).unwrap_err();
        assert!(matches!(
            e,
            Error::ChannelMismatch {
                expected: 4,
                got: 3,
                ..
            }
        ));
    }
}

//! Per-channel statistics shared by the CPU backends: partial moments and
//! Chan's merge of them, PyTorch's running-statistics update, and the
//! statistics a backward uses.

use crate::config::BatchNormConfig;
use crate::error::Result;
use crate::state::{BatchNormState, SavedBatchStats};
use crate::validate;

/// Count, mean and sum of squared deviations (`M2`) of some values, in `f64`:
/// the partial statistics of a slice of a channel.
///
/// ```
/// use wgpu_batchnorm::Moments;
/// let a = Moments { n: 2.0, mean: 1.0, m2: 2.0 }; // 0, 2
/// let b = Moments { n: 1.0, mean: 4.0, m2: 0.0 }; // 4
/// let all = a.merge(b);                           // 0, 2, 4
/// assert_eq!((all.n, all.mean, all.m2), (3.0, 2.0, 8.0));
/// assert_eq!(all.var(), 8.0 / 3.0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    /// Number of values.
    pub n: f64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl Moments {
    /// Chan's parallel merge: the moments of the union of both sets of values.
    ///
    /// ```text
    /// d = mean_b - mean_a, n = n_a + n_b
    /// mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n
    /// ```
    ///
    /// A part whose mean is infinite or NaN (it held `±inf` or NaN) gives
    /// PyTorch's statistics of the union, those of a sum: the mean is
    /// `mean_a + mean_b` (`+inf` with finite values, NaN for `inf - inf`)
    /// and `M2` is NaN, where Chan's `d` would meet `inf - inf`.
    ///
    /// ```
    /// use wgpu_batchnorm::Moments;
    /// let inf = Moments { n: 1.0, mean: f64::INFINITY, m2: f64::NAN };
    /// let finite = Moments { n: 3.0, mean: 2.0, m2: 1.0 };
    /// assert_eq!(finite.merge(inf).mean, f64::INFINITY);
    /// assert!(finite.merge(inf).m2.is_nan());
    /// let minus = Moments { n: 1.0, mean: f64::NEG_INFINITY, m2: f64::NAN };
    /// assert!(inf.merge(minus).mean.is_nan());
    /// ```
    pub fn merge(self, other: Moments) -> Moments {
        if other.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return other;
        }
        let n = self.n + other.n;
        if !(self.mean.is_finite() && other.mean.is_finite()) {
            return Moments {
                n,
                mean: self.mean + other.mean,
                m2: f64::NAN,
            };
        }
        let d = other.mean - self.mean;
        Moments {
            n,
            mean: self.mean + d * (other.n / n),
            m2: self.m2 + other.m2 + d * d * (self.n * other.n / n),
        }
    }

    /// Biased variance `M2 / n`.
    pub fn var(self) -> f64 {
        self.m2 / self.n
    }
}

/// PyTorch's update of the running statistics after a training step on `m`
/// values per channel with batch means `mean` and biased variances `var`;
/// nothing without tracked statistics.
///
/// ```text
/// num_batches_tracked += 1
/// f = momentum, or 1 / num_batches_tracked when momentum is None
/// running_mean = (1-f) running_mean + f mean
/// running_var  = (1-f) running_var  + f var M/(M-1)      (unbiased)
/// ```
pub(crate) fn update_running(
    state: &mut BatchNormState,
    config: &BatchNormConfig,
    mean: &[f64],
    var: &[f64],
    m: usize,
) {
    if !config.track_running_stats {
        return;
    }
    let nbt = state.num_batches_tracked.unwrap_or(0) + 1;
    let f = config.momentum_factor(nbt);
    let m = m as f64;
    let rm = state.running_mean.as_mut().expect("tracked");
    let rv = state.running_var.as_mut().expect("tracked");
    for c in 0..mean.len() {
        rm[c] = ((1.0 - f) * f64::from(rm[c]) + f * mean[c]) as f32;
        rv[c] = ((1.0 - f) * f64::from(rv[c]) + f * var[c] * m / (m - 1.0)) as f32;
    }
    state.num_batches_tracked = Some(nbt);
}

/// The per-channel `(center, invstd)` a backward on an input of shape `dims`
/// uses: with `batch_stats`, the statistics `saved` by the forward of that
/// shape; otherwise the running mean and `1 / sqrt(running_var + eps)`.
///
/// # Errors
/// [`crate::Error::NoSavedStatistics`] when batch statistics of this shape were not saved.
pub(crate) fn backward_stats(
    config: &BatchNormConfig,
    state: &BatchNormState,
    saved: Option<&SavedBatchStats>,
    dims: &[usize],
    batch_stats: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if batch_stats {
        validate::saved_shape(saved.map(|s| &s.dims[..]), dims)?;
        let s = saved.expect("checked above");
        return Ok((s.mean.clone(), s.invstd.clone()));
    }
    let rm = state.running_mean.as_ref().expect("tracked");
    let rv = state.running_var.as_ref().expect("tracked");
    Ok((
        rm.iter().map(|&v| f64::from(v)).collect(),
        rv.iter()
            .map(|&v| 1.0 / (f64::from(v) + config.eps).sqrt())
            .collect(),
    ))
}

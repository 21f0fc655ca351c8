//! The fold of one BatchNorm into one layer's weight and bias (formula in
//! the [module docs](super)).

use crate::error::{Error, Result};
use crate::state::BatchNormState;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::fmt;

/// The layer a BatchNorm is folded into, which says where its output
/// channels lie in the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldTarget {
    /// `torch.nn.Conv1d/2d/3d` (any number of spatial dims, any groups):
    /// weight `(out, in/groups, k...)`, output channels first.
    Conv,
    /// `torch.nn.ConvTranspose1d/2d/3d`: weight `(in, out/groups, k...)`.
    /// PyTorch's `fuse_conv_bn_weights(..., transpose=True)` covers `groups = 1`.
    ConvTranspose {
        /// The layer's `groups` (1 unless grouped).
        groups: usize,
    },
    /// `torch.nn.Linear`: weight `(out, in)`.
    Linear,
}

impl fmt::Display for FoldTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conv => f.write_str("convolution"),
            Self::ConvTranspose { groups: 1 } => f.write_str("transposed convolution"),
            Self::ConvTranspose { groups } => {
                write!(f, "transposed convolution (groups {groups})")
            }
            Self::Linear => f.write_str("linear layer"),
        }
    }
}

/// A layer's weight and bias with a BatchNorm folded in.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedLayer {
    /// The new weight, in the original weight's shape.
    pub weight: ArrayD<f32>,
    /// The new bias, one per output channel (present even when the layer had none).
    pub bias: Vec<f32>,
}

/// Folds the BatchNorm `bn` (its running statistics, and `weight`/`bias`
/// when affine) with epsilon `eps` into the convolution before it: weight
/// `(out, in/groups, k...)` with one or more spatial dims, optional `bias`
/// `(out,)`. See the [module docs](super) for the formula.
///
/// # Errors
/// As [`fold`].
pub fn fold_conv(
    weight: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    bn: &BatchNormState,
    eps: f64,
) -> Result<FoldedLayer> {
    fold(FoldTarget::Conv, weight, bias, bn, eps)
}

/// Folds `bn` into the transposed convolution before it: weight
/// `(in, out/groups, k...)`, optional `bias` `(out,)`.
///
/// # Errors
/// As [`fold`].
pub fn fold_conv_transpose(
    weight: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    groups: usize,
    bn: &BatchNormState,
    eps: f64,
) -> Result<FoldedLayer> {
    fold(FoldTarget::ConvTranspose { groups }, weight, bias, bn, eps)
}

/// Folds `bn` into the linear layer before it: weight `(out, in)`, optional
/// `bias` `(out,)`.
///
/// # Errors
/// As [`fold`].
pub fn fold_linear(
    weight: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    bn: &BatchNormState,
    eps: f64,
) -> Result<FoldedLayer> {
    fold(FoldTarget::Linear, weight, bias, bn, eps)
}

/// Folds the BatchNorm `bn` with epsilon `eps` into the layer `target` with
/// `weight` and optional `bias` (a missing bias counts as zeros). A BatchNorm
/// without affine parameters has weight 1 and bias 0.
///
/// # Errors
/// [`Error::Fold`], before anything is computed, when:
/// - `eps` is negative or not finite;
/// - `bn` has no running statistics (`track_running_stats = false`: such a
///   layer normalizes with batch statistics even in evaluation), or its
///   vectors differ in length;
/// - a running mean, weight or bias is not finite, or a running variance is
///   negative or not finite, or `running_var + eps` is not > 0;
/// - the weight's rank is wrong (2 for a linear layer, 3 or more for a
///   convolution), its output channels differ from the BatchNorm's channels,
///   `groups` is 0 or does not divide a transposed convolution's input
///   channels, or `bias` is not one value per output channel;
/// - a folded value overflows `f32` (a huge weight over a tiny variance).
pub fn fold(
    target: FoldTarget,
    weight: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    bn: &BatchNormState,
    eps: f64,
) -> Result<FoldedLayer> {
    let dims = weight.shape().to_vec();
    let err = |message: String| Error::Fold {
        batchnorm: "the BatchNorm".into(),
        layer: format!("the {target} of weight shape {dims:?}"),
        message,
    };
    let (scale, mean, beta) = bn_coefficients(bn, eps).map_err(err)?;
    let channels = scale.len();
    let out = output_channels(target, &dims).map_err(err)?;
    if out != channels {
        return Err(err(format!(
            "the weight has {out} output channels but the BatchNorm has {channels}"
        )));
    }
    if let Some(b) = bias
        && b.len() != channels
    {
        return Err(err(format!(
            "the layer's bias has length {}, expected {channels} (one per output channel)",
            b.len()
        )));
    }

    let w = weight.as_standard_layout();
    let w = w.as_slice().expect("standard layout is contiguous");
    let channel_of = channel_map(target, &dims);
    let inner: usize = match target {
        FoldTarget::ConvTranspose { .. } => dims[2..].iter().product(),
        _ => dims[1..].iter().product(),
    };
    let mut folded = Vec::with_capacity(w.len());
    for (row, chunk) in w.chunks(inner.max(1)).enumerate() {
        let s = scale[channel_of(row)];
        folded.extend(chunk.iter().map(|&v| (f64::from(v) * s) as f32));
    }
    let new_bias: Vec<f32> = (0..channels)
        .map(|c| {
            let b = bias.map_or(0.0, |b| f64::from(b[c]));
            ((b - mean[c]) * scale[c] + beta[c]) as f32
        })
        .collect();

    let overflow = w
        .iter()
        .zip(&folded)
        .position(|(a, b)| a.is_finite() && !b.is_finite())
        .map(|i| format!("weight element {i} ({}) times scale", w[i]))
        .or_else(|| {
            (0..channels)
                .find(|&c| bias.is_none_or(|b| b[c].is_finite()) && !new_bias[c].is_finite())
                .map(|c| format!("bias of channel {c}"))
        });
    if let Some(what) = overflow {
        return Err(err(format!("the folded {what} overflows f32")));
    }
    Ok(FoldedLayer {
        weight: ArrayD::from_shape_vec(IxDyn(&dims), folded).expect("same element count"),
        bias: new_bias,
    })
}

/// The output channels a weight of shape `dims` gives `target`, or why the
/// shape does not fit it.
fn output_channels(target: FoldTarget, dims: &[usize]) -> std::result::Result<usize, String> {
    match target {
        FoldTarget::Linear if dims.len() != 2 => Err(format!(
            "a linear layer's weight is (out, in), rank 2, got rank {}",
            dims.len()
        )),
        FoldTarget::Conv if dims.len() < 3 => Err(format!(
            "a convolution's weight is (out, in/groups, k...), rank 3 or more, got rank {}",
            dims.len()
        )),
        FoldTarget::Linear | FoldTarget::Conv => Ok(dims[0]),
        FoldTarget::ConvTranspose { .. } if dims.len() < 3 => Err(format!(
            "a transposed convolution's weight is (in, out/groups, k...), rank 3 or more, got rank {}",
            dims.len()
        )),
        FoldTarget::ConvTranspose { groups: 0 } => Err("groups must be at least 1".into()),
        FoldTarget::ConvTranspose { groups } if !dims[0].is_multiple_of(groups) => Err(format!(
            "groups {groups} does not divide the {} input channels (dim 0 of a transposed convolution's weight)",
            dims[0]
        )),
        FoldTarget::ConvTranspose { groups } => Ok(dims[1] * groups),
    }
}

/// The output channel of row `r` of the weight viewed as rows of its
/// innermost dims (`dims[1..]`, or `dims[2..]` for a transposed convolution).
fn channel_map(target: FoldTarget, dims: &[usize]) -> impl Fn(usize) -> usize {
    let (per_group_in, out_per_group) = match target {
        FoldTarget::ConvTranspose { groups } => (dims[0] / groups.max(1), dims[1]),
        _ => (0, 0),
    };
    move |r| {
        if per_group_in == 0 || out_per_group == 0 {
            return r;
        }
        let (i, j) = (r / out_per_group, r % out_per_group);
        (i / per_group_in) * out_per_group + j
    }
}

/// Per channel: `scale = gamma / sqrt(running_var + eps)`, the running mean
/// and `beta`, in `f64`, after checking every value.
type Coefficients = (Vec<f64>, Vec<f64>, Vec<f64>);

fn bn_coefficients(bn: &BatchNormState, eps: f64) -> std::result::Result<Coefficients, String> {
    if !eps.is_finite() || eps < 0.0 {
        return Err(format!("eps must be finite and >= 0, got {eps}"));
    }
    let (Some(mean), Some(var)) = (&bn.running_mean, &bn.running_var) else {
        return Err("the BatchNorm has no running statistics (track_running_stats = false); \
                    it normalizes with batch statistics even in evaluation, which no fixed weights reproduce"
            .into());
    };
    let c = mean.len();
    for (name, v) in [
        ("running_var", Some(var)),
        ("weight", bn.weight.as_ref()),
        ("bias", bn.bias.as_ref()),
    ] {
        if let Some(v) = v
            && v.len() != c
        {
            return Err(format!(
                "the BatchNorm's {name} has length {}, but running_mean has {c}",
                v.len()
            ));
        }
    }
    let check_finite = |name: &str, v: &[f32]| match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!(
            "the BatchNorm's {name} of channel {i} is {}, expected a finite value",
            v[i]
        )),
        None => Ok(()),
    };
    check_finite("running_mean", mean)?;
    check_finite("running_var", var)?;
    if let Some(w) = &bn.weight {
        check_finite("weight", w)?;
    }
    if let Some(b) = &bn.bias {
        check_finite("bias", b)?;
    }
    if let Some(i) = var.iter().position(|&v| v < 0.0) {
        return Err(format!(
            "the BatchNorm's running_var of channel {i} is {}, a variance is >= 0",
            var[i]
        ));
    }
    if let Some(i) = var.iter().position(|&v| f64::from(v) + eps <= 0.0) {
        return Err(format!(
            "running_var + eps of channel {i} is {} + {eps} = 0: the BatchNorm divides by its square root",
            var[i]
        ));
    }
    let scale = (0..c)
        .map(|i| {
            let gamma = bn.weight.as_ref().map_or(1.0, |w| f64::from(w[i]));
            // PyTorch's order: gamma * rsqrt(running_var + eps).
            gamma * (1.0 / (f64::from(var[i]) + eps).sqrt())
        })
        .collect();
    let mean = mean.iter().map(|&m| f64::from(m)).collect();
    let beta = (0..c)
        .map(|i| bn.bias.as_ref().map_or(0.0, |b| f64::from(b[i])))
        .collect();
    Ok((scale, mean, beta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_channel_map_walks_groups() {
        // (in 4, out/groups 3, k) with groups 2: rows (i, j) in order.
        let map = channel_map(FoldTarget::ConvTranspose { groups: 2 }, &[4, 3, 2]);
        let got: Vec<usize> = (0..12).map(map).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]);
        let map = channel_map(FoldTarget::Conv, &[5, 3, 2]);
        assert_eq!((0..5).map(map).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    }
}

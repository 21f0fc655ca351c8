//! Folding a BatchNorm into the convolution or linear layer before it, for
//! inference.
//!
//! In evaluation a BatchNorm is a fixed per-channel affine map of its input,
//! so a convolution or linear layer followed by it is one layer with new
//! weights: what `torch.nn.utils.fusion.fuse_conv_bn_weights` and
//! `fuse_linear_bn_weights` compute (and `fuse_conv_bn_eval`, candle's
//! `absorb_bn`). With `c` the output channel, which is the BatchNorm's
//! channel:
//!
//! ```text
//! scale[c] = gamma[c] / sqrt(running_var[c] + eps)       gamma = BatchNorm weight, 1 without affine
//! W'[c, ...] = W[c, ...] * scale[c]                      convolution (out, in/groups, k...), linear (out, in)
//! W'[i, j, ...] = W[i, j, ...] * scale[c(i, j)]          transposed convolution (in, out/groups, k...),
//!                                                        c(i, j) = (i / (in/groups)) * (out/groups) + j
//! b'[c] = (b[c] - running_mean[c]) * scale[c] + beta[c]  b = 0 when the layer has no bias,
//!                                                        beta = BatchNorm bias, 0 without affine
//! ```
//!
//! Every value is computed in `f64` from the `f32` inputs and rounded once
//! to `f32`, which is PyTorch's float64 fusion rounded to float32 (its
//! float32 fusion lands within an ulp or two of it). The folded layer always
//! has a bias, also when the original had none.
//!
//! ```
//! use ndarray::{ArrayD, IxDyn};
//! use wgpu_batchnorm::BatchNormState;
//! use wgpu_batchnorm::fold::fold_conv;
//!
//! // Conv2d(2, 3, 1, bias=False) followed by BatchNorm2d(3), eps 1e-5.
//! let weight = ArrayD::from_shape_vec(IxDyn(&[3, 2, 1, 1]), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
//! let bn = BatchNormState {
//!     weight: Some(vec![1.0, 2.0, 0.5]),
//!     bias: Some(vec![0.0, 1.0, -1.0]),
//!     running_mean: Some(vec![0.5, 0.0, 2.0]),
//!     running_var: Some(vec![4.0, 1.0, 0.25]),
//!     num_batches_tracked: Some(10),
//! };
//! let folded = fold_conv(weight.view(), None, &bn, 1e-5)?;
//! let scale0 = 1.0 / (4.0f64 + 1e-5).sqrt();
//! assert_eq!(folded.weight.shape(), &[3, 2, 1, 1]);
//! assert_eq!(folded.weight[[0, 1, 0, 0]], (2.0 * scale0) as f32);
//! assert_eq!(folded.bias[0], (-0.5 * scale0) as f32);
//!
//! // A channel count that does not match is an error, not a broadcast.
//! let wrong = ArrayD::<f32>::zeros(IxDyn(&[4, 2, 1, 1]));
//! let err = fold_conv(wrong.view(), None, &bn, 1e-5).unwrap_err();
//! assert!(err.to_string().contains("4 output channels"), "{err}");
//! # Ok::<(), wgpu_batchnorm::Error>(())
//! ```
//!
//! With the `safetensors` feature, `fold_state_dict` folds every BatchNorm
//! of a PyTorch `state_dict` into the layer it follows (what `bnorm fold`
//! runs).

mod layer;
#[cfg(feature = "safetensors")]
mod pairs;
#[cfg(feature = "safetensors")]
mod state_dict;

pub use layer::{FoldTarget, FoldedLayer, fold, fold_conv, fold_conv_transpose, fold_linear};
#[cfg(feature = "safetensors")]
pub use pairs::PairRule;
#[cfg(feature = "safetensors")]
pub use state_dict::{FoldOptions, FoldedPair, FoldedStateDict, fold_state_dict};

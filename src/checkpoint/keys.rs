//! PyTorch's key names of a BatchNorm layer in a `state_dict`.

/// PyTorch's parameter and buffer names of a BatchNorm layer, in `state_dict` order.
pub const KEYS: [&str; 5] = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
];

/// `prefix` with a trailing `.` added when it is non-empty and has none.
///
/// ```
/// use wgpu_batchnorm::checkpoint::normalize_prefix;
/// assert_eq!(normalize_prefix("layer1.0.bn1"), "layer1.0.bn1.");
/// assert_eq!(normalize_prefix("layer1.0.bn1."), "layer1.0.bn1.");
/// assert_eq!(normalize_prefix(""), "");
/// ```
pub fn normalize_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_string()
    } else {
        format!("{prefix}.")
    }
}

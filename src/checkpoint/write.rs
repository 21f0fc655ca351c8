//! Writing a BatchNorm layer's state as a safetensors `state_dict`, with
//! PyTorch's key names.

use super::keys::normalize_prefix;
use crate::error::{Error, Result};
use crate::state::BatchNormState;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor to serialize: dtype, shape and little-endian bytes.
pub(crate) struct Owned {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The bytes of a safetensors `state_dict` holding `layers` (prefix, state),
/// with PyTorch's key names: the vectors present as `F32` `(C,)`, the counter
/// as an `I64` scalar. The file's metadata is `{"format": "pt"}` unless
/// `metadata` is given.
///
/// ```
/// use wgpu_batchnorm::{BatchNormConfig, BatchNormState, StateDict, checkpoint};
/// let config = BatchNormConfig::new(3);
/// let state = BatchNormState::new(&config);
/// let bytes = checkpoint::states_to_bytes(&[("features.1", &state)], None)?;
/// let back = StateDict::from_bytes(bytes, "memory")?.state("features.1", &config)?;
/// assert_eq!(back, state);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
///
/// # Errors
/// [`Error::Checkpoint`] when two layers give the same key, or a state's
/// vectors differ in length.
pub fn states_to_bytes(
    layers: &[(&str, &BatchNormState)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let err = |message: String| Error::Checkpoint {
        path: "(being written)".into(),
        message,
    };
    let mut tensors: BTreeMap<String, Owned> = BTreeMap::new();
    for (prefix, state) in layers {
        let p = normalize_prefix(prefix);
        let vectors = [
            ("weight", &state.weight),
            ("bias", &state.bias),
            ("running_mean", &state.running_mean),
            ("running_var", &state.running_var),
        ];
        let lens: Vec<usize> = vectors
            .iter()
            .filter_map(|(_, v)| v.as_ref().map(Vec::len))
            .collect();
        if lens.windows(2).any(|w| w[0] != w[1]) {
            return Err(err(format!(
                "the state for prefix {prefix:?} has vectors of different lengths {lens:?}"
            )));
        }
        let mut entries: Vec<(String, Owned)> = vectors
            .into_iter()
            .filter_map(|(name, v)| {
                v.as_ref().map(|v| {
                    let owned = Owned {
                        dtype: Dtype::F32,
                        shape: vec![v.len()],
                        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    };
                    (format!("{p}{name}"), owned)
                })
            })
            .collect();
        if let Some(n) = state.num_batches_tracked {
            let n = i64::try_from(n).map_err(|_| {
                err(format!(
                    "num_batches_tracked {n} of prefix {prefix:?} does not fit PyTorch's I64"
                ))
            })?;
            entries.push((
                format!("{p}num_batches_tracked"),
                Owned {
                    dtype: Dtype::I64,
                    shape: Vec::new(),
                    data: n.to_le_bytes().to_vec(),
                },
            ));
        }
        for (key, t) in entries {
            if tensors.insert(key.clone(), t).is_some() {
                return Err(err(format!("key `{key}` is written twice")));
            }
        }
    }
    let info: HashMap<String, String> = match metadata {
        Some(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        None => HashMap::from([("format".to_string(), "pt".to_string())]),
    };
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
        .map_err(|e| err(format!("serialization failed: {e}")))
}

/// Writes the state of one layer at `prefix` to a safetensors file at `path`
/// (see [`states_to_bytes`]); `torch.load_state_dict(safetensors.torch.load_file(path), strict=False)`
/// reads it back into a model.
///
/// # Errors
/// As [`states_to_bytes`]; [`Error::Io`] when the file cannot be written.
pub fn save_state(path: impl AsRef<Path>, prefix: &str, state: &BatchNormState) -> Result<()> {
    save_states(path, &[(prefix, state)])
}

/// Writes several layers to one safetensors file at `path` (see [`states_to_bytes`]).
///
/// # Errors
/// As [`states_to_bytes`]; [`Error::Io`] when the file cannot be written.
pub fn save_states(path: impl AsRef<Path>, layers: &[(&str, &BatchNormState)]) -> Result<()> {
    let path = path.as_ref();
    let bytes = states_to_bytes(layers, None).map_err(|e| match e {
        Error::Checkpoint { message, .. } => Error::Checkpoint {
            path: path.display().to_string(),
            message,
        },
        other => other,
    })?;
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        action: "write",
        path: path.display().to_string(),
        source,
    })
}

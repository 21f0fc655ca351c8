//! PyTorch checkpoints: a BatchNorm layer's state to and from a safetensors
//! `state_dict`, with PyTorch's key names.
//!
//! A `torch.nn.BatchNorm1d/2d/3d` at module path `layer1.0.bn1` stores
//!
//! ```text
//! layer1.0.bn1.weight               F32 (C,)   affine only
//! layer1.0.bn1.bias                 F32 (C,)   affine only
//! layer1.0.bn1.running_mean         F32 (C,)   track_running_stats only
//! layer1.0.bn1.running_var          F32 (C,)   track_running_stats only
//! layer1.0.bn1.num_batches_tracked  I64 ()     track_running_stats only
//! ```
//!
//! which is what `safetensors.torch.save_file(model.state_dict(), path)` writes.
//! Loading is strict, like PyTorch's `load_state_dict(strict=True)`: a missing
//! key, a key the configuration rules out, a wrong shape or a wrong dtype is an
//! [`Error::Checkpoint`] naming the file, the key and what was expected.
//! `F16` and `BF16` parameters (a `model.half()` checkpoint) are widened to
//! `f32` exactly; other dtypes are refused.
//!
//! ```no_run
//! use wgpu_batchnorm::{BatchNormBackend, CpuReference, StateDict, checkpoint};
//!
//! let sd = StateDict::open("resnet.safetensors")?;
//! for layer in sd.batchnorm_layers() {
//!     println!("{layer}"); // layer1.0.bn1: 64 features, affine, num_batches_tracked 5
//! }
//! let config = sd.config("layer1.0.bn1")?;           // num_features, affine, tracking from the keys
//! let state = sd.state("layer1.0.bn1", &config)?;
//! let mut bn = CpuReference::new(config)?;
//! bn.set_state(&state)?;
//!
//! checkpoint::save_state("bn1.safetensors", "layer1.0.bn1", &bn.state()?)?;
//! # Ok::<(), wgpu_batchnorm::Error>(())
//! ```

use crate::config::BatchNormConfig;
use crate::error::{Error, Result};
use crate::state::BatchNormState;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

mod keys;
mod write;

pub use keys::{KEYS, normalize_prefix};
pub(crate) use write::Owned;
pub use write::{save_state, save_states, states_to_bytes};

/// A BatchNorm layer found in a `state_dict` by [`StateDict::batchnorm_layers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchNormLayer {
    /// Module path without the trailing dot, e.g. `layer1.0.bn1` (empty for a bare layer).
    pub prefix: String,
    /// Number of channels (length of `running_mean`).
    pub num_features: usize,
    /// Whether `weight` and `bias` are stored.
    pub affine: bool,
    /// The stored counter, when present and readable.
    pub num_batches_tracked: Option<u64>,
}

impl fmt::Display for BatchNormLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.prefix.is_empty() {
            "(no prefix)"
        } else {
            &self.prefix
        };
        write!(f, "{name}: {} features", self.num_features)?;
        f.write_str(if self.affine {
            ", affine"
        } else {
            ", no affine"
        })?;
        if let Some(n) = self.num_batches_tracked {
            write!(f, ", num_batches_tracked {n}")?;
        }
        Ok(())
    }
}

/// A safetensors `state_dict` file, checked on open, read by key.
#[derive(Debug, Clone)]
pub struct StateDict {
    name: String,
    bytes: Vec<u8>,
}

impl StateDict {
    /// Reads a safetensors file.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read; [`Error::Checkpoint`] when it is not
    /// a valid safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::error::read_file(path)?;
        Self::from_bytes(bytes, path.display().to_string())
    }

    /// Takes the bytes of a safetensors file; `name` stands for the file in errors.
    ///
    /// ```
    /// use wgpu_batchnorm::StateDict;
    /// let err = StateDict::from_bytes(vec![1, 2, 3], "model.safetensors").unwrap_err();
    /// assert!(err.to_string().starts_with("checkpoint model.safetensors: not a safetensors file"));
    /// ```
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the bytes are not a valid safetensors file.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<String>) -> Result<Self> {
        let sd = Self {
            name: name.into(),
            bytes,
        };
        sd.view()?;
        Ok(sd)
    }

    /// The file name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Checkpoint {
            path: self.name.clone(),
            message: message.into(),
        }
    }

    pub(crate) fn view(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes)
            .map_err(|e| self.error(format!("not a safetensors file ({e})")))
    }

    /// The `__metadata__` entries (empty when there are none).
    ///
    /// # Errors
    /// Never after a successful construction; kept for symmetry with the parser.
    pub fn metadata(&self) -> Result<BTreeMap<String, String>> {
        let (_, header) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| self.error(format!("not a safetensors file ({e})")))?;
        Ok(header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    /// Every tensor name, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .view()
            .map(|v| v.names().into_iter().map(String::from).collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// The BatchNorm layers in the file, in natural module order (`layer2`
    /// before `layer10`): every prefix with 1-D `running_mean` and
    /// `running_var` of one length.
    ///
    /// Layers without tracked statistics store only `weight` and `bias`, like a
    /// LayerNorm, and cannot be told apart from one; they are not listed.
    pub fn batchnorm_layers(&self) -> Vec<BatchNormLayer> {
        let Ok(st) = self.view() else {
            return Vec::new();
        };
        let shape = |key: &str| st.tensor(key).ok().map(|t| t.shape().to_vec());
        let mut layers: Vec<BatchNormLayer> = st
            .names()
            .into_iter()
            .filter_map(|k| k.strip_suffix("running_mean"))
            .filter(|p| p.is_empty() || p.ends_with('.'))
            .filter_map(|p| {
                let c = match shape(&format!("{p}running_mean"))?.as_slice() {
                    [c] => *c,
                    _ => return None,
                };
                if shape(&format!("{p}running_var"))? != [c] {
                    return None;
                }
                let affine = shape(&format!("{p}weight")).is_some_and(|s| s == [c])
                    && shape(&format!("{p}bias")).is_some_and(|s| s == [c]);
                let num_batches_tracked = st
                    .tensor(&format!("{p}num_batches_tracked"))
                    .ok()
                    .and_then(|t| read_counter(&t).ok());
                Some(BatchNormLayer {
                    prefix: p.strip_suffix('.').unwrap_or(p).to_string(),
                    num_features: c,
                    affine,
                    num_batches_tracked,
                })
            })
            .collect();
        layers.sort_by_cached_key(|l| natural_key(&l.prefix));
        layers
    }

    /// The configuration of the layer at `prefix`, from the keys present:
    /// `num_features` from `running_mean` (or `weight`), `affine` when `weight`
    /// is stored, `track_running_stats` when `running_mean` is. `eps` and
    /// `momentum` are not part of a `state_dict`: they are PyTorch's defaults
    /// (1e-5, 0.1); set them with [`BatchNormConfig::with_eps`] and
    /// [`BatchNormConfig::with_momentum`] when the model used others.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when neither `running_mean` nor `weight` exists
    /// under `prefix`, or it is not 1-D.
    pub fn config(&self, prefix: &str) -> Result<BatchNormConfig> {
        let st = self.view()?;
        let p = normalize_prefix(prefix);
        let key = |k: &str| format!("{p}{k}");
        let track = st.tensor(&key("running_mean")).is_ok();
        let affine = st.tensor(&key("weight")).is_ok();
        let probe = if track { "running_mean" } else { "weight" };
        let t = st.tensor(&key(probe)).map_err(|_| {
            self.error(format!(
                "no BatchNorm layer at prefix {prefix:?}: neither `{}` nor `{}` exists{}",
                key("running_mean"),
                key("weight"),
                self.suggest()
            ))
        })?;
        let c = match t.shape() {
            [c] => *c,
            s => {
                return Err(self.error(format!(
                    "`{}` has shape {s:?}, expected a 1-D (C,) tensor: is {prefix:?} a BatchNorm layer?",
                    key(probe)
                )));
            }
        };
        Ok(BatchNormConfig::new(c)
            .with_affine(affine)
            .with_track_running_stats(track))
    }

    fn suggest(&self) -> String {
        let layers = self.batchnorm_layers();
        if layers.is_empty() {
            return String::new();
        }
        let names: Vec<&str> = layers.iter().take(8).map(|l| l.prefix.as_str()).collect();
        let more = if layers.len() > 8 { ", ..." } else { "" };
        format!(
            " (BatchNorm prefixes in the file: {}{more})",
            names.join(", ")
        )
    }

    /// The state of the layer at `prefix` (a trailing `.` is optional) for `config`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`], naming the key, for a missing key, a key the
    /// configuration rules out (`weight` without `affine`, statistics without
    /// `track_running_stats`), a shape other than `(C,)` (`()` or `(1,)` for
    /// `num_batches_tracked`), a dtype other than `F32`/`F16`/`BF16` (`I64` for
    /// `num_batches_tracked`), or a negative counter.
    pub fn state(&self, prefix: &str, config: &BatchNormConfig) -> Result<BatchNormState> {
        let st = self.view()?;
        let p = normalize_prefix(prefix);
        let c = config.num_features;
        let get = |name: &str,
                   wanted: bool,
                   flag: &str|
         -> Result<Option<safetensors::tensor::TensorView<'_>>> {
            let key = format!("{p}{name}");
            match (st.tensor(&key).ok(), wanted) {
                (Some(t), true) => Ok(Some(t)),
                (None, false) => Ok(None),
                (None, true) => Err(self.error(format!(
                    "missing key `{key}` (the layer has {flag} = true){}",
                    self.suggest()
                ))),
                (Some(_), false) => Err(self.error(format!(
                    "unexpected key `{key}`: the layer has {flag} = false"
                ))),
            }
        };
        let vector = |name: &str, wanted: bool, flag: &str| -> Result<Option<Vec<f32>>> {
            let Some(t) = get(name, wanted, flag)? else {
                return Ok(None);
            };
            let key = format!("{p}{name}");
            if t.shape() != [c] {
                return Err(self.error(format!(
                    "`{key}` has shape {:?}, expected [{c}] (num_features)",
                    t.shape()
                )));
            }
            read_floats(&t)
                .map(Some)
                .map_err(|dtype| self.error(format!("`{key}` has dtype {dtype:?}, expected F32")))
        };
        let (affine, track) = (config.affine, config.track_running_stats);
        let state = BatchNormState {
            weight: vector("weight", affine, "affine")?,
            bias: vector("bias", affine, "affine")?,
            running_mean: vector("running_mean", track, "track_running_stats")?,
            running_var: vector("running_var", track, "track_running_stats")?,
            num_batches_tracked: match get("num_batches_tracked", track, "track_running_stats")? {
                None => None,
                Some(t) => Some(
                    read_counter(&t)
                        .map_err(|why| self.error(format!("`{p}num_batches_tracked` {why}")))?,
                ),
            },
        };
        state.validate(config)?;
        Ok(state)
    }
}

/// Reads an `F32` (or exactly widened `F16`/`BF16`) tensor; `Err(dtype)` otherwise.
pub(crate) fn read_floats(
    t: &safetensors::tensor::TensorView<'_>,
) -> std::result::Result<Vec<f32>, Dtype> {
    let b = t.data();
    match t.dtype() {
        Dtype::F32 => Ok(b
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Dtype::F16 => Ok(b
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(b
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        other => Err(other),
    }
}

/// Reads an `I64` scalar (shape `()` or `(1,)`) that is not negative.
fn read_counter(t: &safetensors::tensor::TensorView<'_>) -> std::result::Result<u64, String> {
    if t.dtype() != Dtype::I64 {
        return Err(format!("has dtype {:?}, expected I64", t.dtype()));
    }
    if !matches!(t.shape(), [] | [1]) {
        return Err(format!("has shape {:?}, expected a scalar ()", t.shape()));
    }
    let b = t.data();
    let v = b
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_le_bytes)
        .ok_or_else(|| "holds no value".to_string())?;
    u64::try_from(v).map_err(|_| format!("is {v}, expected a count >= 0"))
}

/// Splits a module path into text and numbers, so `layer2` sorts before `layer10`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch.is_ascii_digit() {
            let mut n = u64::from(ch as u8 - b'0');
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(u64::from(d));
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(ch);
        }
    }
    out.push((text, u64::MAX));
    out
}

/// The BatchNorm layers of a safetensors `state_dict` file (see
/// [`StateDict::batchnorm_layers`]).
///
/// ```no_run
/// for layer in wgpu_batchnorm::checkpoint::list_batchnorm_layers("tests/checkpoints/resnet_bn.safetensors")? {
///     println!("{}", layer.prefix);
/// }
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
///
/// # Errors
/// As [`StateDict::open`].
pub fn list_batchnorm_layers(path: impl AsRef<Path>) -> Result<Vec<BatchNormLayer>> {
    Ok(StateDict::open(path)?.batchnorm_layers())
}

/// Loads the state of the layer at `prefix` of the file at `path` for `config`.
///
/// ```no_run
/// use wgpu_batchnorm::{BatchNormConfig, checkpoint};
/// let state = checkpoint::load_state("model.safetensors", "layer1.0.bn1", &BatchNormConfig::new(64))?;
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
///
/// # Errors
/// As [`StateDict::open`] and [`StateDict::state`].
pub fn load_state(
    path: impl AsRef<Path>,
    prefix: &str,
    config: &BatchNormConfig,
) -> Result<BatchNormState> {
    StateDict::open(path)?.state(prefix, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_layer2_before_layer10() {
        let mut v = vec![
            "layer10.bn",
            "layer2.bn",
            "bn",
            "layer2.0.bn1",
            "layer1.10.bn",
            "layer1.9.bn",
        ];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(
            v,
            [
                "bn",
                "layer1.9.bn",
                "layer1.10.bn",
                "layer2.0.bn1",
                "layer2.bn",
                "layer10.bn"
            ]
        );
    }
}

//! Folding every BatchNorm of a PyTorch `state_dict` (safetensors) into the
//! layer it follows: what `bnorm fold` runs.

use super::layer::{FoldTarget, fold};
use super::pairs::{PairRule, candidates};
use crate::checkpoint::{KEYS, Owned, StateDict, read_floats};
use crate::error::{Error, Result};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

/// What [`fold_state_dict`] needs beyond the file.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldOptions {
    /// The BatchNorms' epsilon, which a `state_dict` does not store
    /// (PyTorch's default, 1e-5, unless set).
    pub eps: f64,
    /// `(layer, batchnorm)` module paths paired by the caller, for
    /// BatchNorms the naming rules do not pair (or pair wrongly).
    pub pairs: Vec<(String, String)>,
    /// Layers that are transposed convolutions, with their `groups`. Their
    /// weight is `(in, out/groups, k...)`, which a square `(C, C, k...)`
    /// weight does not tell from a convolution's, so they are never guessed.
    pub transposed: Vec<(String, usize)>,
    /// BatchNorms to leave as they are (with all their keys).
    pub keep: Vec<String>,
}

impl Default for FoldOptions {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            pairs: Vec::new(),
            transposed: Vec::new(),
            keep: Vec::new(),
        }
    }
}

/// One BatchNorm folded into one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldedPair {
    /// The layer's module path, e.g. `layer1.0.conv1`.
    pub layer: String,
    /// The BatchNorm's module path, e.g. `layer1.0.bn1`.
    pub batchnorm: String,
    /// What the layer is.
    pub target: FoldTarget,
    /// How the two were paired.
    pub rule: PairRule,
    /// The layer's weight shape.
    pub weight_shape: Vec<usize>,
    /// Whether the layer had no bias and the folded file adds `<layer>.bias`
    /// (the model must then be built with `bias=True` for that layer).
    pub bias_added: bool,
}

impl fmt::Display for FoldedPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}: {} {:?}{} ({})",
            self.batchnorm,
            self.layer,
            self.target,
            self.weight_shape,
            if self.bias_added { ", bias added" } else { "" },
            self.rule
        )
    }
}

/// A `state_dict` with BatchNorms folded in, ready to write.
#[derive(Debug, Clone)]
pub struct FoldedStateDict {
    /// The folds, in the BatchNorms' module order.
    pub pairs: Vec<FoldedPair>,
    /// The BatchNorms left as they were ([`FoldOptions::keep`]).
    pub kept: Vec<String>,
    /// The keys of the folded BatchNorms, not in the new file, sorted.
    pub removed_keys: Vec<String>,
    /// The number of tensors in the new file.
    pub tensors: usize,
    bytes: Vec<u8>,
}

impl FoldedStateDict {
    /// The new safetensors file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes the new safetensors file to `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, &self.bytes).map_err(|source| Error::Io {
            action: "write",
            path: path.display().to_string(),
            source,
        })
    }
}

/// Folds every BatchNorm of `sd` with running statistics into the layer it
/// follows (paired by [`FoldOptions::pairs`], else by the rules of
/// [`PairRule`]: a Sequential index or `bn` in the name), except those in
/// [`FoldOptions::keep`]. The new file holds every other tensor unchanged,
/// the folded layers' `weight` and `bias` (in the dtype of the layer's
/// weight and bias), no key of a folded BatchNorm (`num_batches_tracked`
/// included), and the original's metadata.
///
/// A layer of rank-2 weight is a linear layer, of higher rank a convolution,
/// or a transposed convolution when listed in [`FoldOptions::transposed`].
/// The pairing reads names only: a BatchNorm that follows an activation, or
/// precedes its convolution (pre-activation ResNets, DenseNet), cannot be
/// folded into the layer before it, and names do not say so; check the
/// reported pairs, and keep such BatchNorms.
///
/// ```no_run
/// use wgpu_batchnorm::StateDict;
/// use wgpu_batchnorm::fold::{FoldOptions, fold_state_dict};
///
/// let sd = StateDict::open("resnet18.safetensors")?;
/// let folded = fold_state_dict(&sd, &FoldOptions::default())?;
/// for pair in &folded.pairs {
///     println!("{pair}"); // layer1.0.bn1 -> layer1.0.conv1: convolution [64, 64, 3, 3], bias added (name)
/// }
/// folded.save("resnet18_folded.safetensors")?;
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
///
/// # Errors
/// [`Error::Checkpoint`] naming every BatchNorm no rule pairs (with the
/// layers tried), a pair given twice or to a missing layer or non-BatchNorm,
/// a layer two BatchNorms fold into, a [`FoldOptions::transposed`] or
/// [`FoldOptions::keep`] entry that names nothing folded or no BatchNorm, or a
/// tensor of a dtype other than F32, F16 or BF16; [`Error::Fold`] naming the
/// layer when a BatchNorm does not fit it (see [`fold`](super::layer::fold)).
/// Nothing is written on error.
pub fn fold_state_dict(sd: &StateDict, options: &FoldOptions) -> Result<FoldedStateDict> {
    let st = sd.view()?;
    let error = |message: String| Error::Checkpoint {
        path: sd.name().to_string(),
        message,
    };
    let weight_rank = |prefix: &str| {
        st.tensor(&format!("{prefix}.weight"))
            .ok()
            .map(|t| t.shape().len())
    };
    let bns: Vec<String> = sd
        .batchnorm_layers()
        .into_iter()
        .map(|l| l.prefix)
        .collect();
    let is_bn: BTreeSet<&str> = bns.iter().map(String::as_str).collect();

    for k in &options.keep {
        if !is_bn.contains(k.as_str()) {
            return Err(error(format!(
                "cannot keep `{k}`: it is not a BatchNorm with running statistics in the file"
            )));
        }
    }
    let mut given: BTreeMap<&str, &str> = BTreeMap::new();
    for (layer, bn) in &options.pairs {
        if !is_bn.contains(bn.as_str()) {
            return Err(error(format!(
                "pair {layer}={bn}: `{bn}` is not a BatchNorm with running statistics in the file"
            )));
        }
        if is_bn.contains(layer.as_str()) || weight_rank(layer).is_none_or(|r| r < 2) {
            return Err(error(format!(
                "pair {layer}={bn}: `{layer}` is not a layer with a weight of rank 2 or more (`{layer}.weight`)"
            )));
        }
        if options.keep.contains(bn) {
            return Err(error(format!(
                "`{bn}` is both paired ({layer}={bn}) and kept"
            )));
        }
        if given.insert(bn, layer).is_some() {
            return Err(error(format!("`{bn}` is paired twice")));
        }
    }

    let mut pairs: Vec<(String, String, PairRule)> = Vec::new();
    let mut unpaired: Vec<String> = Vec::new();
    for bn in bns.iter().filter(|b| !options.keep.contains(b)) {
        if let Some(layer) = given.get(bn.as_str()) {
            pairs.push((layer.to_string(), bn.clone(), PairRule::Given));
            continue;
        }
        let Some((rule, tried)) = candidates(bn) else {
            let name = if bn.is_empty() { "(no prefix)" } else { bn };
            unpaired.push(format!(
                "`{name}`: no rule applies (its name is not a Sequential index and holds no `bn`)"
            ));
            continue;
        };
        let found: Vec<&String> = tried
            .iter()
            .filter(|c| !is_bn.contains(c.as_str()) && weight_rank(c).is_some_and(|r| r >= 2))
            .collect();
        match found.as_slice() {
            [layer] => pairs.push(((*layer).clone(), bn.clone(), rule)),
            [] if tried.is_empty() => unpaired.push(format!(
                "`{bn}`: first in its Sequential, nothing before it"
            )),
            [] => unpaired.push(format!(
                "`{bn}`: none of {} has a weight of rank 2 or more",
                quoted(&tried)
            )),
            many => unpaired.push(format!(
                "`{bn}`: more than one layer fits ({})",
                quoted(&many.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            )),
        }
    }
    if !unpaired.is_empty() {
        return Err(error(format!(
            "{} BatchNorm(s) cannot be paired with the layer before them by name: {}; pair them \
             explicitly (`bnorm fold --pair LAYER=BATCHNORM`) or keep them (`--keep BATCHNORM`)",
            unpaired.len(),
            unpaired.join("; ")
        )));
    }
    let mut layer_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (layer, bn, _) in &pairs {
        if let Some(other) = layer_of.insert(layer, bn) {
            return Err(error(format!(
                "both `{other}` and `{bn}` would fold into `{layer}`; pair one of them explicitly or keep it"
            )));
        }
    }
    let transposed: HashMap<&str, usize> = options
        .transposed
        .iter()
        .map(|(l, g)| (l.as_str(), *g))
        .collect();
    for l in transposed.keys() {
        if !layer_of.contains_key(l) {
            return Err(error(format!(
                "transposed layer `{l}` is not a layer any BatchNorm folds into"
            )));
        }
    }

    let mut out: BTreeMap<String, Owned> = BTreeMap::new();
    let mut report = Vec::new();
    for (layer, bn, rule) in pairs {
        let (folded, pair) = fold_pair(sd, &st, &layer, &bn, rule, &transposed, options.eps)?;
        out.extend(folded);
        report.push(pair);
    }
    let folded_bns: BTreeSet<&str> = report.iter().map(|p| p.batchnorm.as_str()).collect();
    let mut removed_keys = Vec::new();
    for (key, t) in st.tensors() {
        let bn_key = key
            .rsplit_once('.')
            .is_some_and(|(p, leaf)| folded_bns.contains(p) && KEYS.contains(&leaf))
            || (folded_bns.contains("") && KEYS.contains(&key.as_str()));
        if bn_key {
            removed_keys.push(key);
        } else {
            out.entry(key).or_insert_with(|| Owned {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data: t.data().to_vec(),
            });
        }
    }
    removed_keys.sort();
    let mut metadata: HashMap<String, String> = sd.metadata()?.into_iter().collect();
    if metadata.is_empty() {
        metadata.insert("format".into(), "pt".into());
    }
    let tensors = out.len();
    let bytes = safetensors::serialize(out.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
        .map_err(|e| error(format!("serialization failed: {e}")))?;
    Ok(FoldedStateDict {
        pairs: report,
        kept: options.keep.clone(),
        removed_keys,
        tensors,
        bytes,
    })
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Folds `bn` into `layer`: the new `weight` and `bias` tensors and the report.
fn fold_pair(
    sd: &StateDict,
    st: &safetensors::SafeTensors<'_>,
    layer: &str,
    bn: &str,
    rule: PairRule,
    transposed: &HashMap<&str, usize>,
    eps: f64,
) -> Result<(Vec<(String, Owned)>, FoldedPair)> {
    let error = |message: String| Error::Checkpoint {
        path: sd.name().to_string(),
        message,
    };
    let (wkey, bkey) = (format!("{layer}.weight"), format!("{layer}.bias"));
    let floats = |key: &str, t: &TensorView<'_>| {
        read_floats(t).map_err(|d| {
            error(format!(
                "`{key}` has dtype {d:?}; folding reads F32, F16 or BF16"
            ))
        })
    };
    let w = st
        .tensor(&wkey)
        .map_err(|_| error(format!("missing key `{wkey}`")))?;
    let dims = w.shape().to_vec();
    let weight = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&dims), floats(&wkey, &w)?)
        .map_err(|e| error(format!("`{wkey}`: {e}")))?;
    let b = st.tensor(&bkey).ok();
    let bias = match &b {
        Some(t) if t.shape().len() != 1 => {
            return Err(error(format!(
                "`{bkey}` has shape {:?}, expected (out,)",
                t.shape()
            )));
        }
        Some(t) => Some(floats(&bkey, t)?),
        None => None,
    };
    let target = match (dims.len(), transposed.get(layer)) {
        (2, None) => FoldTarget::Linear,
        (2, Some(_)) => {
            return Err(error(format!(
                "`{layer}` is listed as a transposed convolution but its weight {dims:?} has rank 2"
            )));
        }
        (_, Some(&groups)) => FoldTarget::ConvTranspose { groups },
        _ => FoldTarget::Conv,
    };
    let config = sd.config(bn)?;
    let state = sd.state(bn, &config)?;
    let folded = fold(target, weight.view(), bias.as_deref(), &state, eps).map_err(|e| match e {
        Error::Fold { message, .. } => {
            let c = config.num_features;
            let hint = if target == FoldTarget::Conv && dims.get(1) == Some(&c) && dims[0] != c {
                format!("; if `{layer}` is a transposed convolution, say so (`--transposed {layer}`)")
            } else {
                String::new()
            };
            Error::Fold {
                batchnorm: format!("`{bn}`"),
                layer: format!("`{layer}` ({target} of weight shape {dims:?})"),
                message: format!("{message}{hint}"),
            }
        }
        other => other,
    })?;
    let wdtype = w.dtype();
    let bdtype = b.as_ref().map_or(wdtype, TensorView::dtype);
    let tensors = vec![
        (
            wkey,
            encode(wdtype, dims.clone(), folded.weight.iter().copied()),
        ),
        (
            bkey,
            encode(bdtype, vec![folded.bias.len()], folded.bias.iter().copied()),
        ),
    ];
    let pair = FoldedPair {
        layer: layer.to_string(),
        batchnorm: bn.to_string(),
        target,
        rule,
        weight_shape: dims,
        bias_added: b.is_none(),
    };
    Ok((tensors, pair))
}

/// `values` as a tensor of `dtype`, one of those [`read_floats`] reads.
fn encode(dtype: Dtype, shape: Vec<usize>, values: impl Iterator<Item = f32>) -> Owned {
    let data = match dtype {
        Dtype::F16 => values
            .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.flat_map(f32::to_le_bytes).collect(),
    };
    let dtype = if matches!(dtype, Dtype::F16 | Dtype::BF16) {
        dtype
    } else {
        Dtype::F32
    };
    Owned { dtype, shape, data }
}

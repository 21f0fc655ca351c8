//! Which layer a BatchNorm follows, from the module paths of a `state_dict`.
//!
//! A `state_dict` keeps no graph, and a safetensors file not even the module
//! order (its keys are sorted), so the pairing reads the BatchNorm's own
//! module path `parent.leaf`:
//!
//! ```text
//! leaf is a number k >= 1   Sequential   parent.(k-1)              features.1    -> features.0
//!                                                                  layer1.0.downsample.1 -> layer1.0.downsample.0
//! leaf contains "bn"        name         parent.<leaf, bn -> conv> layer1.0.bn1  -> layer1.0.conv1
//!                                        parent.<leaf, bn -> fc>   bn            -> conv
//!                                        parent.<leaf, bn -> linear>
//! ```
//!
//! A proposed layer counts when the file holds its `weight` of rank 2 or
//! more and it is not itself a BatchNorm; exactly one must count. Nothing
//! else is guessed: a BatchNorm that no rule pairs is an error naming what
//! was tried, and the caller pairs it explicitly or keeps it.

/// How a BatchNorm was paired with the layer it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairRule {
    /// A `torch.nn.Sequential` index: `features.1` follows `features.0`.
    Sequential,
    /// The BatchNorm's name with `bn` replaced by `conv`, `fc` or `linear`:
    /// `layer1.0.bn1` follows `layer1.0.conv1`.
    Name,
    /// Given by the caller ([`FoldOptions::pairs`](super::FoldOptions::pairs), `bnorm fold --pair`).
    Given,
}

impl std::fmt::Display for PairRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sequential => "Sequential index",
            Self::Name => "name",
            Self::Given => "given",
        })
    }
}

/// The rule that applies to the BatchNorm at module path `prefix` and the
/// layers it proposes, best first; `None` when no rule applies. A
/// Sequential index 0 proposes nothing (nothing comes before it).
pub(crate) fn candidates(prefix: &str) -> Option<(PairRule, Vec<String>)> {
    let (parent, leaf) = match prefix.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, prefix),
    };
    let join = |leaf: &str| match parent {
        Some(p) => format!("{p}.{leaf}"),
        None => leaf.to_string(),
    };
    if !leaf.is_empty() && leaf.bytes().all(|b| b.is_ascii_digit()) {
        let k: u64 = leaf.parse().ok()?;
        let before = k.checked_sub(1).map(|k| join(&k.to_string()));
        return Some((PairRule::Sequential, before.into_iter().collect()));
    }
    if leaf.contains("bn") {
        let names = ["conv", "fc", "linear"]
            .iter()
            .map(|r| join(&leaf.replace("bn", r)))
            .collect();
        return Some((PairRule::Name, names));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str) -> Option<(PairRule, Vec<String>)> {
        candidates(prefix)
    }

    #[test]
    fn sequential_index_points_one_back() {
        assert_eq!(
            names("features.1"),
            Some((PairRule::Sequential, vec!["features.0".into()]))
        );
        assert_eq!(
            names("layer1.0.downsample.1"),
            Some((PairRule::Sequential, vec!["layer1.0.downsample.0".into()]))
        );
        assert_eq!(
            names("head.12"),
            Some((PairRule::Sequential, vec!["head.11".into()]))
        );
        assert_eq!(names("features.0"), Some((PairRule::Sequential, vec![])));
    }

    #[test]
    fn bn_in_the_name_becomes_conv_fc_linear() {
        assert_eq!(
            names("layer1.0.bn1"),
            Some((
                PairRule::Name,
                vec![
                    "layer1.0.conv1".into(),
                    "layer1.0.fc1".into(),
                    "layer1.0.linear1".into()
                ]
            ))
        );
        assert_eq!(
            names("bn").map(|(_, v)| v),
            Some(vec!["conv".into(), "fc".into(), "linear".into()])
        );
        assert_eq!(
            names("model.0.bn").map(|(_, v)| v[0].clone()),
            Some("model.0.conv".into())
        );
    }

    #[test]
    fn other_names_have_no_rule() {
        assert_eq!(names("up_norm"), None);
        assert_eq!(names("layer1.norm1"), None);
        assert_eq!(names(""), None);
    }
}

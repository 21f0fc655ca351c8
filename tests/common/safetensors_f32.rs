//! Reading safetensors files in the fold tests: every F32 tensor with its
//! shape, and the metadata.

use ndarray::{ArrayD, IxDyn};
use safetensors::SafeTensors;
use std::collections::BTreeMap;

/// Tensors by name.
pub type Tensors = BTreeMap<String, ArrayD<f32>>;

/// Every F32 tensor of safetensors bytes, with its shape, and the metadata.
pub fn load(bytes: &[u8]) -> (Tensors, BTreeMap<String, String>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let meta = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = st
        .tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(k, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap())
        })
        .collect();
    (tensors, meta)
}

// How the plain backward reductions (backward_partial, backward_partial_vec4)
// read their upstream gradient: `dy` as it is. Put before the file, which
// defines the item types `Item` (Elem or Elem4) and `ItemF` (f32 or
// vec4<f32>); upstream_gated.wgsl is the fused backward's counterpart.
@group(0) @binding(2) var<storage, read> dy: array<Item>;

// The upstream gradient of item `i`, widened to f32 (`live`: the item is
// inside the slice; used by upstream_gated.wgsl).
fn upstream(i: u32, live: bool) -> ItemF {
    return ItemF(dy[i]);
}

// How the plain backward passes (backward_partial, backward_partial_vec4,
// backward_dx, backward_dx_vec4) read their upstream gradient: `dy` as it
// is. Put before the file, which defines the item types `Item` (Elem or
// Elem4) and `ItemF` (f32 or vec4<f32>); upstream_gated.wgsl and
// upstream_in_place.wgsl are the fused backward's counterparts.
@group(0) @binding(2) var<storage, read> dy: array<Item>;

// The upstream gradient of item `i`, widened to f32 (`live`: the item is
// inside the slice; used by upstream_gated.wgsl).
fn upstream(i: u32, live: bool) -> ItemF {
    return ItemF(dy[i]);
}

// How the plain backward passes (backward_partial, backward_partial_vec4,
// backward_dx, backward_dx_vec4) read their upstream gradient: `dy` as it
// is. Put after items.wgsl or items_vec4.wgsl (the item types `Item`,
// `ItemF` and their conversions); upstream_gated.wgsl and
// upstream_in_place.wgsl are the fused backward's counterparts.
@group(0) @binding(2) var<storage, read> dy: array<Item>;

// The upstream gradient of item `w`, widened to f32 (`write`: used by
// upstream_gated.wgsl).
fn upstream(w: u32, write: bool) -> ItemF {
    return load_item(dy[w]);
}

// How the dx pass of a fused backward without a residual (the variants
// backward_dx_in_place, backward_dx_vec4_in_place) reads its upstream
// gradient: from dx itself, where the gated reduction (upstream_gated.wgsl)
// left the gated dy, each item read before it is overwritten by the same
// thread. `dy` stays bound, as in the plain pass, and unread. Put after the
// item types (see upstream.wgsl).
@group(0) @binding(2) var<storage, read> dy: array<Item>;

// The gated upstream gradient of item `w`, widened to f32.
fn upstream(w: u32, write: bool) -> ItemF {
    return load_item(dx[w]);
}

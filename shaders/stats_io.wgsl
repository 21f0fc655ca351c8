// The bindings of the training statistics passes besides `x` (stats_partial,
// stats_partial_vec4), and what they share, after reduce.wgsl and counter.wgsl.
@group(0) @binding(0) var<uniform> p: Params;
// (mean of x - K, M2, K, SEEN_* bits) per (channel, slice), K the first
// element of the channel in the chunk bound as `x`; the count follows from
// the slice bounds.
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
// The layer's state; only its counter section is touched (see common.wgsl).
@group(0) @binding(3) var<storage, read_write> state: array<u32>;

// With FLAG_UPDATE_RUNNING, one thread of the pass counts the batch
// (count_batch_now of counter.wgsl, which goes before this part) for
// stats_finalize. (Only the first chunk's dispatch has the flag.)
fn count_batch(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    if linear_workgroup(wid, nwg) != 0u || lid != 0u || (p.flags & FLAG_UPDATE_RUNNING) == 0u {
        return;
    }
    count_batch_now();
}

// Stores the merged moments `m` of channel `c` (shift `k`) for slice `s` of
// this chunk.
fn store_moments(c: u32, s: u32, m: Moments, k: f32) {
    partials[c * p.part_stride + p.part_base + s] = vec4<f32>(m.mean, m.m2, k, f32(m.seen));
}

// The bindings of the training statistics passes besides `x` (stats_partial,
// stats_partial_vec4), and what they share, after reduce.wgsl.
@group(0) @binding(0) var<uniform> p: Params;
// (mean of x - K, M2, K, SEEN_* bits) per (channel, slice); the count follows
// from the slice bounds.
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
// The layer's state; only its counter section is touched (see common.wgsl).
@group(0) @binding(3) var<storage, read_write> state: array<u32>;

// With FLAG_UPDATE_RUNNING, one thread of the pass counts the batch in
// num_batches_tracked and stores the momentum factor of this step for
// stats_finalize: Params.momentum, or 1 / num_batches_tracked with
// FLAG_CUMULATIVE (PyTorch counts the batch before it computes the factor).
fn count_batch(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    if linear_workgroup(wid, nwg) != 0u || lid != 0u || (p.flags & FLAG_UPDATE_RUNNING) == 0u {
        return;
    }
    let at = COUNTER * p.state_stride;
    let low = state[at + BATCHES_LOW] + 1u;
    state[at + BATCHES_LOW] = low;
    if low == 0u {
        state[at + BATCHES_HIGH] += 1u;
    }
    var k = p.momentum;
    if (p.flags & FLAG_CUMULATIVE) != 0u {
        k = 1.0 / (f32(state[at + BATCHES_HIGH]) * 4294967296.0 + f32(low));
    }
    state[at + MOMENTUM_BITS] = bitcast<u32>(k);
}

// Stores the merged moments `m` of channel `c` (shift `k`) for slice `s`.
fn store_moments(c: u32, s: u32, m: Moments, k: f32) {
    partials[c * p.slices + s] = vec4<f32>(m.mean, m.m2, k, f32(m.seen));
}

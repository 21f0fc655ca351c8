// Training statistics, stage 2: per channel, Chan-merge the slices into the
// batch mean K + d (K the channel's first element, d the mean of x - K) and
// the biased variance; write the saved statistics (K, d, invstd), the
// coefficients of the normalize pass and (with FLAG_UPDATE_RUNNING) the
// running statistics, in place (finish.wgsl), with the momentum factor
// stats_partial stored for this step.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;   // (mean of x - K, M2, K, SEEN_* bits)
@group(0) @binding(2) var<storage, read_write> state: array<u32>;        // sections: see common.wgsl
@group(0) @binding(3) var<storage, read_write> saved: array<vec4<f32>>;  // (K, d, invstd, 0)
@group(0) @binding(4) var<storage, read_write> coef: array<vec4<f32>>;   // (center, scale, shift, 0)

@compute @workgroup_size(WG_CHANNEL)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_workgroup(wid, nwg) * WG_CHANNEL + lid;
    if c >= p.channels {
        return;
    }
    // Each chunk's slices are shifted by the chunk's own first element of
    // the channel; the channel's shift K is the first chunk's, and a slice of
    // another chunk moves its mean by the difference of the shifts (exact
    // for shifts within a factor of 2 of each other, and zero with one chunk).
    let shift = partials[c * p.slices].z;
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    var seen = 0u;
    for (var s = 0u; s < p.slices; s++) {
        let part = partials[c * p.slices + s];
        seen |= u32(part.w);
        let nb = f32(slice_count(p, s));
        let nt = n + nb;
        let d = (part.x + (part.z - shift)) - mean;
        mean += d * (nb / nt);
        m2 += part.y + d * d * (n * nb / nt);
        n = nt;
    }
    // Welford and Chan only add non-negative terms, so m2 >= 0; no max(),
    // which would turn the NaN of a channel holding a NaN into a number.
    let var_biased = m2 * p.inv_m;
    let invstd = invstd_of(var_biased);
    coef[c] = vec4<f32>(coef_of(c, shift, mean, invstd, seen), 0.0);
    save_channel(c, shift, mean, var_biased, invstd, seen);
}

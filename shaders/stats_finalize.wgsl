// Training statistics, stage 2: per channel, Chan-merge the slices into the
// batch mean K + d (K the channel's first element, d the mean of x - K) and
// the biased variance; write the saved statistics (K, d, invstd), the
// coefficients of the normalize pass and (with FLAG_UPDATE_RUNNING) the
// running statistics, in place, with the momentum factor stats_partial stored
// for this step. The normalize pass centres on K and folds d into its shift:
//   y = (x - K) * scale + (bias - d * scale),   scale = weight * invstd
// so that no f32 rounding of the mean reaches x - mean.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;   // (mean of x - K, M2, K, SEEN_* bits)
@group(0) @binding(2) var<storage, read_write> state: array<f32>;        // sections: see common.wgsl
@group(0) @binding(3) var<storage, read_write> saved: array<vec4<f32>>;  // (K, d, invstd, 0)
@group(0) @binding(4) var<storage, read_write> coef: array<vec4<f32>>;   // (center, scale, shift, 0)

// Keep in sync with stats_partial.wgsl.
const SEEN_POS_INF: u32 = 1u;
const SEEN_NEG_INF: u32 = 2u;
const NAN_BITS: u32 = 0x7fc00000u;
const POS_INF_BITS: u32 = 0x7f800000u;
const NEG_INF_BITS: u32 = 0xff800000u;

// The batch mean of a channel that held non-finite values (`seen` != 0),
// PyTorch's: +inf or -inf when it held only one kind of infinity besides
// finite values, else NaN. Its variance is NaN either way.
fn non_finite_mean(seen: u32) -> f32 {
    if seen == SEEN_POS_INF {
        return bitcast<f32>(POS_INF_BITS);
    }
    if seen == SEEN_NEG_INF {
        return bitcast<f32>(NEG_INF_BITS);
    }
    return bitcast<f32>(NAN_BITS);
}

// PyTorch's `(1 - k) * running + k * mean` for a mean of +-inf or NaN, chosen
// explicitly rather than left to arithmetic on infinities.
fn running_non_finite(running: f32, mean: f32, k: f32) -> f32 {
    let nan = bitcast<f32>(NAN_BITS);
    let mean_bits = bitcast<u32>(mean);
    if mean_bits == NAN_BITS || !(k > 0.0) {
        return nan;
    }
    let r_bits = bitcast<u32>(running);
    let r_finite = (r_bits & 0x7f800000u) != 0x7f800000u;
    return select(nan, mean, r_finite || r_bits == mean_bits);
}

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
    let s = p.state_stride;
    let im = RUNNING_MEAN * s + c;
    let iv = RUNNING_VAR * s + c;
    let k = state[COUNTER * s + MOMENTUM_BITS];
    if seen != 0u {
        // y, invstd and the running variance are NaN; the mean is PyTorch's
        let nan = bitcast<f32>(NAN_BITS);
        let special = non_finite_mean(seen);
        saved[c] = vec4<f32>(special, 0.0, nan, 0.0);
        coef[c] = vec4<f32>(special, nan, nan, 0.0);
        if (p.flags & FLAG_UPDATE_RUNNING) != 0u {
            state[im] = running_non_finite(state[im], special, k);
            state[iv] = nan;
        }
        return;
    }
    let var_biased = m2 * p.inv_m;
    let invstd = 1.0 / sqrt(var_biased + p.eps);
    saved[c] = vec4<f32>(shift, mean, invstd, 0.0);
    let scale = state[WEIGHT * s + c] * invstd;
    coef[c] = vec4<f32>(shift, scale, state[BIAS * s + c] - mean * scale, 0.0);
    if (p.flags & FLAG_UPDATE_RUNNING) != 0u {
        state[im] = (1.0 - k) * state[im] + k * (shift + mean);
        state[iv] = (1.0 - k) * state[iv] + k * (var_biased * p.unbias);
    }
}

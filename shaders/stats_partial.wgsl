// Training statistics, stage 1: Welford mean and M2 of one slice of one
// channel, shifted by the channel's first element K: every thread runs
// Welford over `x - K` for a strided part of the slice, then the workgroup
// merges the threads with Chan's formula. `x - K` is exact for values near K,
// so the mean comes out as K plus a small part held to f32 precision of the
// spread, not of the mean (stats_finalize keeps both).
// With FLAG_UPDATE_RUNNING, one thread also counts the batch in
// num_batches_tracked and stores the momentum factor of this step for
// stats_finalize: Params.momentum, or 1 / num_batches_tracked with
// FLAG_CUMULATIVE (PyTorch counts the batch before it computes the factor).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
// (mean of x - K, M2, K, SEEN_* bits) per (channel, slice); the count follows
// from the slice bounds.
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
// The layer's state; only its counter section is touched (see common.wgsl).
@group(0) @binding(3) var<storage, read_write> state: array<u32>;

var<workgroup> sh_n: array<f32, WG>;
var<workgroup> sh_mean: array<f32, WG>;
var<workgroup> sh_m2: array<f32, WG>;
var<workgroup> sh_flags: array<u32, WG>;

// Bits of what a slice held besides finite values, told apart by the bits of
// the value (not by comparisons, which WGSL lets a driver assume never meet
// NaN or infinity): they stay out of Welford's sums, and stats_finalize gives
// the channel PyTorch's statistics for them.
const SEEN_POS_INF: u32 = 1u;
const SEEN_NEG_INF: u32 = 2u;
const SEEN_NAN: u32 = 4u;

// 0 for a finite value, else its SEEN_* bit.
fn non_finite(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    if (bits & 0x7f800000u) != 0x7f800000u {
        return 0u;
    }
    if (bits & 0x007fffffu) != 0u {
        return SEEN_NAN;
    }
    return select(SEEN_POS_INF, SEEN_NEG_INF, (bits >> 31u) != 0u);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    if g == 0u && lid == 0u && (p.flags & FLAG_UPDATE_RUNNING) != 0u {
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
    let c = g / p.slices;
    let s = g % p.slices;
    if c >= p.channels {
        return;
    }
    let shift = f32(x[element_index(p, c, 0u)]);
    let begin = s * p.slice_len;
    let end = begin + slice_count(p, s);
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    var seen = 0u;
    for (var m = begin + lid; m < end; m = next_index(m, end)) {
        let raw = f32(x[element_index(p, c, m)]);
        let special = non_finite(raw);
        if special != 0u {
            seen |= special;
            continue;
        }
        let v = raw - shift;
        n += 1.0;
        let d = v - mean;
        mean += d / n;
        m2 += d * (v - mean);
    }
    sh_n[lid] = n;
    sh_mean[lid] = mean;
    sh_m2[lid] = m2;
    sh_flags[lid] = seen;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            let na = sh_n[lid];
            let nb = sh_n[lid + stride];
            let nt = na + nb;
            sh_flags[lid] |= sh_flags[lid + stride];
            if nb > 0.0 {
                let d = sh_mean[lid + stride] - sh_mean[lid];
                sh_mean[lid] += d * (nb / nt);
                sh_m2[lid] += sh_m2[lid + stride] + d * d * (na * nb / nt);
                sh_n[lid] = nt;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        partials[c * p.slices + s] = vec4<f32>(sh_mean[0], sh_m2[0], shift, f32(sh_flags[0]));
    }
}

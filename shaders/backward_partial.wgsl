// Backward, stage 1: per (channel, slice), S1 = sum(dy) and
// S2 = sum(dy * (x - K)), centred on the K the forward saved (the channel's
// first element, or the running mean of an evaluation forward);
// backward_finalize subtracts d * S1 for the mean K + d.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read> dy: array<Elem>;
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;   // (K, d, invstd, 0)
@group(0) @binding(4) var<storage, read_write> partials: array<vec2<f32>>;   // (S1, S2)

var<workgroup> sh_s1: array<f32, WG>;
var<workgroup> sh_s2: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    let c = g / p.slices;
    let s = g % p.slices;
    if c >= p.channels {
        return;
    }
    let center = saved[c].x;
    let begin = s * p.slice_len;
    let end = begin + slice_count(p, s);
    var s1 = 0.0;
    var s2 = 0.0;
    for (var m = begin + lid; m < end; m = next_index(m, end)) {
        let idx = element_index(p, c, m);
        let gy = f32(dy[idx]);
        s1 += gy;
        s2 += gy * (f32(x[idx]) - center);
    }
    sh_s1[lid] = s1;
    sh_s2[lid] = s2;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            sh_s1[lid] += sh_s1[lid + stride];
            sh_s2[lid] += sh_s2[lid + stride];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        partials[c * p.slices + s] = vec2<f32>(sh_s1[0], sh_s2[0]);
    }
}

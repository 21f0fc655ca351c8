// Backward, stage 2: per channel, sum the slices into S1, S2 and write
// dweight = S2 * invstd, dbias = S1 (sections of the layer's state) and the coefficients of
// dx = a * dy + b * (x - center) + c:
//   batch statistics (FLAG_BATCH_STATS): a = w*invstd, b = -a*invstd^2*S2/M, c = -a*S1/M
//   running statistics:                  a = w*invstd, b = c = 0
// where (center, invstd) are the statistics the forward saved.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec2<f32>>;   // (S1, S2)
@group(0) @binding(2) var<storage, read> saved: array<vec2<f32>>;      // (mean, invstd)
@group(0) @binding(3) var<storage, read_write> state: array<f32>;      // sections: see common.wgsl
@group(0) @binding(4) var<storage, read_write> coef: array<vec4<f32>>; // (center, a, b, c)

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
    var s1 = 0.0;
    var s2 = 0.0;
    for (var s = 0u; s < p.slices; s++) {
        let part = partials[c * p.slices + s];
        s1 += part.x;
        s2 += part.y;
    }
    let st = saved[c];
    let invstd = st.y;
    let s = p.state_stride;
    state[DWEIGHT * s + c] = s2 * invstd;
    state[DBIAS * s + c] = s1;
    let a = state[WEIGHT * s + c] * invstd;
    if (p.flags & FLAG_BATCH_STATS) != 0u {
        coef[c] = vec4<f32>(st.x, a, -a * invstd * invstd * s2 * p.inv_m, -a * s1 * p.inv_m);
    } else {
        coef[c] = vec4<f32>(st.x, a, 0.0, 0.0);
    }
}

// Backward, stage 2: per channel, sum the slices into S1 and
// S2 = sum(dy * (x - mean)) = sum(dy * (x - K)) - d * S1 (the forward saved the
// mean as K + d), and write dweight = S2 * invstd, dbias = S1 (sections of the
// layer's state) and the coefficients of dx = a * dy + b * (x - K) + c':
//   batch statistics (FLAG_BATCH_STATS): a = w*invstd, b = -(a*invstd) * (S2/M*invstd),
//                                        c' = -a*S1/M - b*d
//   running statistics:                  a = w*invstd, b = c' = 0
// The products are ordered so that a huge invstd (a constant channel with a
// tiny eps) meets S2 = 0 before it meets another invstd: PyTorch's order.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec2<f32>>;   // (S1, S2 about K)
@group(0) @binding(2) var<storage, read> saved: array<vec4<f32>>;      // (K, d, invstd, 0)
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
    let invstd = st.z;
    s2 -= st.y * s1;
    let s = p.state_stride;
    state[DWEIGHT * s + c] = s2 * invstd;
    state[DBIAS * s + c] = s1;
    let a = state[WEIGHT * s + c] * invstd;
    if (p.flags & FLAG_BATCH_STATS) != 0u {
        let b = -(a * invstd) * (s2 * p.inv_m * invstd);
        coef[c] = vec4<f32>(st.x, a, b, -a * s1 * p.inv_m - b * st.y);
    } else {
        coef[c] = vec4<f32>(st.x, a, 0.0, 0.0);
    }
}

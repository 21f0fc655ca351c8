// Evaluation: coefficients of the normalize pass from the running statistics,
// `scale = weight / sqrt(running_var + eps)`, centred on the running mean, and
// the statistics a backward of this forward uses: (running_mean, 0, invstd),
// in the (K, d, invstd) form of stats_finalize.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> state: array<f32>;              // sections: see common.wgsl
@group(0) @binding(2) var<storage, read_write> saved: array<vec4<f32>>;  // (K, d, invstd, 0)
@group(0) @binding(3) var<storage, read_write> coef: array<vec4<f32>>;   // (center, scale, shift, 0)

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
    let s = p.state_stride;
    let mean = state[RUNNING_MEAN * s + c];
    let root = sqrt(state[RUNNING_VAR * s + c] + p.eps);
    saved[c] = vec4<f32>(mean, 0.0, 1.0 / root, 0.0);
    coef[c] = vec4<f32>(mean, state[WEIGHT * s + c] / root, state[BIAS * s + c], 0.0);
}

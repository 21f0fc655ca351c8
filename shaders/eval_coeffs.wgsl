// Evaluation: coefficients of the normalize pass from the running statistics,
// `scale = weight / sqrt(running_var + eps)`, centred on the running mean.
// Run once after the running statistics or parameters change.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> wb: array<vec2<f32>>;        // (weight, bias)
@group(0) @binding(2) var<storage, read> running: array<vec2<f32>>;   // (mean, var)
@group(0) @binding(3) var<storage, read_write> coef: array<vec4<f32>>;

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
    let r = running[c];
    let affine = wb[c];
    coef[c] = vec4<f32>(r.x, affine.x / sqrt(r.y + p.eps), affine.y, 0.0);
}

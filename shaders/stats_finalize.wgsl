// Training statistics, stage 2: per channel, Chan-merge the slices into the
// batch mean and biased variance; write the saved statistics, the coefficients
// of the normalize pass and (when asked) the updated running statistics.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read> wb: array<vec2<f32>>;           // (weight, bias)
@group(0) @binding(3) var<storage, read> running_in: array<vec2<f32>>;   // (mean, var)
@group(0) @binding(4) var<storage, read_write> running_out: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> saved: array<vec2<f32>>;  // (mean, invstd)
@group(0) @binding(6) var<storage, read_write> coef: array<vec4<f32>>;   // (center, scale, shift, 0)

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
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var s = 0u; s < p.slices; s++) {
        let part = partials[c * p.slices + s];
        let nb = f32(slice_count(p, s));
        let nt = n + nb;
        let d = part.x - mean;
        mean += d * (nb / nt);
        m2 += part.y + d * d * (n * nb / nt);
        n = nt;
    }
    // Welford and Chan only add non-negative terms, so m2 >= 0; no max(),
    // which would turn the NaN of a channel holding a NaN into a number.
    let var_biased = m2 * p.inv_m;
    let invstd = 1.0 / sqrt(var_biased + p.eps);
    saved[c] = vec2<f32>(mean, invstd);
    let affine = wb[c];
    coef[c] = vec4<f32>(mean, affine.x * invstd, affine.y, 0.0);
    if (p.flags & FLAG_UPDATE_RUNNING) != 0u {
        let r = running_in[c];
        let k = p.momentum;
        running_out[c] = vec2<f32>(
            (1.0 - k) * r.x + k * mean,
            (1.0 - k) * r.y + k * (var_biased * p.unbias),
        );
    }
}

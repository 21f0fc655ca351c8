// Elementwise `y = (x - center[c]) * scale[c] + shift[c]`, four elements per
// thread; used when the element count is a multiple of 4.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(2) var<storage, read> coef: array<vec4<f32>>;   // (center, scale, shift, 0)
@group(0) @binding(3) var<storage, read_write> y: array<Elem4>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = linear_workgroup(wid, nwg) * WG + lid;
    let i = j * 4u;
    if i >= p.total {
        return;
    }
    let v = vec4<f32>(x[j]);
    if p.inner % 4u == 0u {
        // All four lanes lie in one channel.
        let k = coef[channel_of(p, i)];
        y[j] = Elem4((v - k.x) * k.y + k.z);
    } else {
        let k0 = coef[channel_of(p, i)];
        let k1 = coef[channel_of(p, i + 1u)];
        let k2 = coef[channel_of(p, i + 2u)];
        let k3 = coef[channel_of(p, i + 3u)];
        let center = vec4<f32>(k0.x, k1.x, k2.x, k3.x);
        let scale = vec4<f32>(k0.y, k1.y, k2.y, k3.y);
        let shift = vec4<f32>(k0.z, k1.z, k2.z, k3.z);
        y[j] = Elem4((v - center) * scale + shift);
    }
}

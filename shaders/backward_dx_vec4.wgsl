// Backward, stage 3: dx = a*dy + b*(x - center) + c, four elements per thread;
// used when the element count is a multiple of 4.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(2) var<storage, read> dy: array<Elem4>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>;   // (center, a, b, c)
@group(0) @binding(4) var<storage, read_write> dx: array<Elem4>;

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
    let g = vec4<f32>(dy[j]);
    if p.inner % 4u == 0u {
        // All four lanes lie in one channel.
        let k = coef[channel_of(p, i)];
        // b = 0 (running statistics) drops the x term: a NaN in x stays out of dx.
        let xt = select(k.z * (v - k.x), vec4<f32>(0.0), k.z == 0.0);
        dx[j] = Elem4(k.y * g + xt + k.w);
    } else {
        let k0 = coef[channel_of(p, i)];
        let k1 = coef[channel_of(p, i + 1u)];
        let k2 = coef[channel_of(p, i + 2u)];
        let k3 = coef[channel_of(p, i + 3u)];
        let center = vec4<f32>(k0.x, k1.x, k2.x, k3.x);
        let a = vec4<f32>(k0.y, k1.y, k2.y, k3.y);
        let b = vec4<f32>(k0.z, k1.z, k2.z, k3.z);
        let cc = vec4<f32>(k0.w, k1.w, k2.w, k3.w);
        let xt = select(b * (v - center), vec4<f32>(0.0), b == vec4<f32>(0.0));
        dx[j] = Elem4(a * g + xt + cc);
    }
}

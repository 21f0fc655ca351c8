// Backward, stage 3: dx = a*dy + b*(x - center) + c, one element per thread.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read> dy: array<Elem>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>;   // (center, a, b, c)
@group(0) @binding(4) var<storage, read_write> dx: array<Elem>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_workgroup(wid, nwg) * WG + lid;
    if i >= p.total {
        return;
    }
    let k = coef[channel_of(p, i)];
    // b = 0 (running statistics) drops the x term, so a NaN in x stays out of dx,
    // as in PyTorch, whose evaluation backward never reads x.
    let xt = select(k.z * (f32(x[i]) - k.x), 0.0, k.z == 0.0);
    dx[i] = Elem(k.y * f32(dy[i]) + xt + k.w);
}

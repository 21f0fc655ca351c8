// Elementwise `y = (x - center[c]) * scale[c] + shift[c]`, one element per thread.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read> coef: array<vec4<f32>>;   // (center, scale, shift, 0)
@group(0) @binding(3) var<storage, read_write> y: array<Elem>;

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
    y[i] = Elem((f32(x[i]) - k.x) * k.y + k.z);
}

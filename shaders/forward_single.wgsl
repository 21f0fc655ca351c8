// Single-pass training forward (single.wgsl) for vec4 items: four elements
// of one run of one channel (ITEMS_RUN4: channels-first, runs a multiple of
// 4 long) or one element each of four adjacent channels (ITEMS_LANES: one
// element per run, channels-last or (N, C), C a multiple of 4). Fused
// (FUSED): `y = act(BN(x) + z)`; otherwise `z` is not read (an unfused call
// binds `x` there). Items: single_vec4.wgsl.
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(4) var<storage, read_write> y: array<Elem4>;
@group(0) @binding(5) var<storage, read> z: array<Elem4>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let at = place(wid, nwg, lid);
    let items = items_per_channel();
    var v: array<vec4<f32>, K_MAX>;
    var ix: array<u32, K_MAX>;
    var shift = vec4(0.0);
    var s = vec4(0.0);
    var seen = vec4(0u);
    if at.live {
        let first = load4(x[item_at(at.g, 0u)]);
        shift = select(vec4(first.x), first, ITEMS == ITEMS_LANES);
        for (var k = 0u; k < K; k++) {
            let i = at.l + k * T;
            if i < items {
                ix[k] = item_at(at.g, i);
                let raw = load4(x[ix[k]]);
                v[k] = raw;
                seen |= non_finite(bitcast<vec4<u32>>(raw));
                s += raw - shift;
            }
        }
    }
    let mean = group_mean(at, s, seen);
    var q = vec4(0.0);
    for (var k = 0u; k < K; k++) {
        if at.live && at.l + k * T < items {
            let e = (v[k] - shift) - mean.d;
            q += e * e;
        }
    }
    let co = group_coefs(at, shift, mean, q);
    if !at.live {
        return;
    }
    for (var k = 0u; k < K; k++) {
        if at.l + k * T < items {
            var zv = vec4(0.0);
            if (FUSED & FLAG_RESIDUAL) != 0u {
                zv = load4(z[ix[k]]);
            }
            y[ix[k]] = store4(output(v[k], co, zv));
        }
    }
}

// Single-pass training forward (single.wgsl) for items of four successive
// elements of one channel, loaded and stored one by one (ITEMS_SCALAR):
// channels-first with runs not a multiple of 4 long (7x7 maps), or
// channels-last with C not a multiple of 4. f32 and f16 storage (one element
// per storage word). Fused as forward_single.
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(4) var<storage, read_write> y: array<Elem>;
@group(0) @binding(5) var<storage, read> z: array<Elem>;

// The index of element `e` of channel `g`.
fn element_at(g: u32, e: u32) -> u32 {
    let o = e / p.inner;
    return (o * p.channels + g) * p.inner + (e - o * p.inner);
}

// Which elements of item `i` lie in the channel.
fn live_of(i: u32) -> vec4<bool> {
    return vec4(4u * i) + vec4(0u, 1u, 2u, 3u) < vec4(p.per_channel);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    count_alone(lid);
    let at = place(wid, nwg, lid);
    let items = (p.per_channel + 3u) / 4u;
    // x - K, kept
    var v: array<vec4<f32>, K_MAX>;
    var ix: array<vec4<u32>, K_MAX>;
    var shift = vec4(0.0);
    var s = vec4(0.0);
    var seen = extremes_new();
    if at.live {
        shift = vec4(load(x[at.g * p.inner]));
        for (var k = 0u; k < K; k++) {
            let i = at.l + k * T;
            if i < items {
                let live = live_of(i);
                var raw = shift;
                for (var q = 0u; q < 4u; q++) {
                    // past the channel's end: its first element, which adds nothing
                    ix[k][q] = element_at(at.g, select(0u, 4u * i + q, live[q]));
                    raw[q] = load(x[ix[k][q]]);
                }
                v[k] = raw - shift;
                seen = extremes_add(seen, raw);
                s += select(vec4(0.0), v[k], live);
            }
        }
    }
    let mean = group_mean(at, s, extremes_seen(seen));
    var q2 = vec4(0.0);
    for (var k = 0u; k < K; k++) {
        let i = at.l + k * T;
        if at.live && i < items {
            let e = v[k] - mean.d;
            q2 += select(vec4(0.0), e * e, live_of(i));
        }
    }
    let co = group_coefs(at, shift, mean, q2);
    if !at.live {
        return;
    }
    for (var k = 0u; k < K; k++) {
        let i = at.l + k * T;
        if i < items {
            let live = live_of(i);
            var zv = vec4(0.0);
            if (FUSED & FLAG_RESIDUAL) != 0u {
                for (var q = 0u; q < 4u; q++) {
                    zv[q] = load(z[ix[k][q]]);
                }
            }
            let out = output(v[k], co, zv);
            for (var q = 0u; q < 4u; q++) {
                if live[q] {
                    y[ix[k][q]] = store(out[q]);
                }
            }
        }
    }
}

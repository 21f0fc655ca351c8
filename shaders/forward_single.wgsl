// Single-pass training forward (single.wgsl) for vec4 items: four elements
// of one run of one channel (ITEMS_RUN4: channels-first, runs a multiple of
// 4 long), one element each of four adjacent channels (ITEMS_LANES: one
// element per run, channels-last or (N, C), C a multiple of 4), or four
// elements of the runs of four adjacent channels (ITEMS_QUADS). With EVAL
// an evaluation forward from the running statistics instead. Fused
// (FUSED): `y = act(BN(x) + z)`; otherwise `z` is not read (an unfused call
// binds `x` there). Items: single_vec4.wgsl.
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(4) var<storage, read_write> y: array<Elem4>;
@group(0) @binding(5) var<storage, read> z: array<Elem4>;

// Stores item `w` of `y` from its values `v` (of `x` with EVAL, else of
// `x - K`), with the group's coefficients spread onto the lanes by `quad`
// (single_vec4.wgsl) and `z` added with FLAG_RESIDUAL in FUSED.
fn store_y(w: u32, quad: u32, v: vec4<f32>, co: Coefs) {
    var zv = vec4(0.0);
    if (FUSED & FLAG_RESIDUAL) != 0u {
        zv = load4(z[w]);
    }
    let lane = Coefs(spread(co.center, quad), spread(co.scale, quad), spread(co.shift, quad));
    y[w] = store4(output(v, lane, zv));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    count_alone(lid);
    let at = place(wid, nwg, lid);
    let items = items_per_channel();
    if EVAL {
        let co = eval_coefs(at);
        for (var k = 0u; k < K; k++) {
            let i = at.l + k * T;
            if at.live && i < items {
                let it = item_of(at.g, i);
                store_y(it.x, it.y, load4(x[it.x]), co);
            }
        }
        return;
    }
    // x - K, kept
    var v: array<vec4<f32>, K_MAX>;
    var ix: array<u32, K_MAX>;
    var quad: array<u32, K_MAX>;
    var shift = vec4(0.0);
    var s = acc_new();
    var seen = seen_new();
    if at.live {
        shift = shift_of(at.g);
        for (var k = 0u; k < K; k++) {
            let i = at.l + k * T;
            if i < items {
                let it = item_of(at.g, i);
                ix[k] = it.x;
                quad[k] = it.y;
                let raw = load4(x[ix[k]]);
                seen = seen_add(seen, raw, quad[k]);
                v[k] = raw - spread(shift, quad[k]);
                s = acc_add(s, v[k], quad[k]);
            }
        }
    }
    let mean = group_mean(at, acc_total(s), seen_total(seen));
    var q = acc_new();
    for (var k = 0u; k < K; k++) {
        if at.live && at.l + k * T < items {
            let e = v[k] - spread(mean.d, quad[k]);
            q = acc_add(q, e * e, quad[k]);
        }
    }
    let co = group_coefs(at, shift, mean, acc_total(q));
    if !at.live {
        return;
    }
    for (var k = 0u; k < K; k++) {
        if at.l + k * T < items {
            store_y(ix[k], quad[k], v[k], co);
        }
    }
}

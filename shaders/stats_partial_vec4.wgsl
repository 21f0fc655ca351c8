// Training statistics, stage 1, for columns of vec4 items: four values of one
// channel (channels-first, runs a multiple of 4 long) or one value each of
// four adjacent channels (FLAG_LANE_CHANNELS: channels-last, C a multiple of
// 4). Welford on the grid of reduce.wgsl, shifted by each channel's first
// element K, as stats_partial.
@group(0) @binding(1) var<storage, read> x: array<Elem4>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    count_batch(wid, nwg, lid);
    let channels = (p.flags & FLAG_LANE_CHANNELS) != 0u;
    let w = red_walk(p, wid, nwg, lid, select(4u, 1u, channels));
    var st = lanes_new();
    var shift = vec4(0.0);
    if w.live {
        let first = load4(x[item_index(p, Cursor(0u, 0u), w.col)]);
        shift = select(vec4(first.x), first, channels);
        let dq = w.step / p.red_inner;
        let dr = w.step - dq * p.red_inner;
        var at = cursor(p, w.begin);
        for (var pos = w.begin; pos < w.end; pos = next_pos(pos, w.end, w.step)) {
            lanes_step(&st, load4(x[item_index(p, at, w.col)]), vec4(true), shift);
            at = advance(p, at, dq, dr);
        }
    }
    if channels {
        for (var k = 0u; k < 4u; k++) {
            let m = tree_moments(lid, lane(st, k), red_tree(p));
            if w.lead && w.live {
                store_moments(w.col * 4u + k, w.slice, m, shift[k]);
            }
        }
    } else {
        let m = tree_moments(lid, lanes_merged(st), red_tree(p));
        if w.lead && w.live {
            store_moments(w.col, w.slice, m, shift.x);
        }
    }
}

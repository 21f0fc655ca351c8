// Training statistics, stage 1, for columns of single elements (a channel's
// runs not a multiple of 4 long, or channels-last with C not a multiple of 4):
// Welford mean and M2 of one slice of a channel on the grid of reduce.wgsl,
// shifted by the channel's first element K. Each thread takes four of its
// positions per step, one per lane. `x - K` is exact for values near K, so
// the mean comes out as K plus a small part held to f32 precision of the
// spread, not of the mean (stats_finalize keeps both).
@group(0) @binding(1) var<storage, read> x: array<Elem>;

// Element `i` of x, widened to f32 from its storage word.
fn x_at(i: u32) -> f32 {
    return elem_of(load(x[i / PER_WORD]), i);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    count_batch(wid, nwg, lid);
    let w = red_walk(p, wid, nwg, lid, 1u);
    var st = lanes_new();
    var shift = 0.0;
    if w.live {
        shift = x_at(item_index(p, Cursor(0u, 0u), w.col));
        let dq = w.step / p.red_inner;
        let dr = w.step - dq * p.red_inner;
        var at = cursor(p, w.begin);
        var pos = w.begin;
        while pos < w.end {
            let q = quad(p, &pos, &at, w, dq, dr);
            let v = vec4(x_at(q.idx.x), x_at(q.idx.y), x_at(q.idx.z), x_at(q.idx.w));
            lanes_step(&st, v, q.live, vec4(shift));
        }
    }
    let m = tree_moments(lid, lanes_merged(st), red_tree(p));
    if w.lead && w.live {
        store_moments(w.col, w.slice, m, shift);
    }
}

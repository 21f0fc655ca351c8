// Backward, stage 1, for columns of single elements: per (channel, slice),
// S1 = sum(dy) and S2 = sum(dy * (x - K)) on the grid of reduce.wgsl, centred
// on the K the forward saved (the channel's first element, or the running
// mean of an evaluation forward); backward_finalize subtracts d * S1 for the
// mean K + d. Each thread takes four of its positions per step. `dy` is
// read through `upstream` (upstream.wgsl, or upstream_gated.wgsl in the
// fused backward's variant, backward_partial_gated), a storage word at a
// time (items.wgsl).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;   // (K, d, invstd, 0)
@group(0) @binding(4) var<storage, read_write> partials: array<vec2<f32>>;   // (S1, S2)

// Element `i` of x, widened to f32 from its storage word.
fn x_at(i: u32) -> f32 {
    return elem_of(load(x[i / PER_WORD]), i);
}

// The upstream gradient of element `i` (`live`: inside the slice). In the
// gated variant the thread of a word's first element writes the word out.
fn dy_at(i: u32, live: bool) -> f32 {
    return elem_of(upstream(i / PER_WORD, live && i % PER_WORD == 0u), i);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = red_walk(p, wid, nwg, lid, 1u);
    var s1 = vec4(0.0);
    var s2 = vec4(0.0);
    if w.live {
        let center = saved[w.col].x;
        let dq = w.step / p.red_inner;
        let dr = w.step - dq * p.red_inner;
        var at = cursor(p, w.begin);
        var pos = w.begin;
        while pos < w.end {
            let q = quad(p, &pos, &at, w, dq, dr);
            let g = vec4(
                dy_at(q.idx.x, q.live.x),
                dy_at(q.idx.y, q.live.y),
                dy_at(q.idx.z, q.live.z),
                dy_at(q.idx.w, q.live.w),
            );
            let v = vec4(x_at(q.idx.x), x_at(q.idx.y), x_at(q.idx.z), x_at(q.idx.w));
            // past the slice's end a lane adds nothing (selected, not
            // multiplied by 0, which would turn an infinity into NaN)
            let gl = select(vec4(0.0), g, q.live);
            s1 += gl;
            s2 += gl * (select(vec4(center), v, q.live) - center);
        }
    }
    let lanes = vec2(s1.x + s1.y + s1.z + s1.w, s2.x + s2.y + s2.z + s2.w);
    let s = tree_sums(lid, lanes, red_tree(p));
    if w.lead && w.live {
        partials[w.col * p.part_stride + p.part_base + w.slice] = s;
    }
}

// Backward, stage 1, for columns of vec4 items (four values of one channel,
// or of four adjacent channels with FLAG_LANE_CHANNELS): S1 = sum(dy) and
// S2 = sum(dy * (x - K)) per (channel, slice), as backward_partial; `dy`
// read through `upstream` as there (items: items_vec4.wgsl).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;   // (K, d, invstd, 0)
@group(0) @binding(4) var<storage, read_write> partials: array<vec2<f32>>;   // (S1, S2)

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let channels = (p.flags & FLAG_LANE_CHANNELS) != 0u;
    let w = red_walk(p, wid, nwg, lid, select(4u, 1u, channels));
    var s1 = vec4(0.0);
    var s2 = vec4(0.0);
    if w.live {
        var center = vec4(saved[w.col].x);
        if channels {
            let c = w.col * 4u;
            center = vec4(saved[c].x, saved[c + 1u].x, saved[c + 2u].x, saved[c + 3u].x);
        }
        let dq = w.step / p.red_inner;
        let dr = w.step - dq * p.red_inner;
        var at = cursor(p, w.begin);
        for (var pos = w.begin; pos < w.end; pos = next_pos(pos, w.end, w.step)) {
            let idx = item_index(p, at, w.col);
            let g = upstream(idx, true);
            s1 += g;
            s2 += g * (load4(x[idx]) - center);
            at = advance(p, at, dq, dr);
        }
    }
    if channels {
        for (var k = 0u; k < 4u; k++) {
            let s = tree_sums(lid, vec2(s1[k], s2[k]), red_tree(p));
            if w.lead && w.live {
                partials[(w.col * 4u + k) * p.part_stride + p.part_base + w.slice] = s;
            }
        }
    } else {
        let lanes = vec2(s1.x + s1.y + s1.z + s1.w, s2.x + s2.y + s2.z + s2.w);
        let s = tree_sums(lid, lanes, red_tree(p));
        if w.lead && w.live {
            partials[w.col * p.part_stride + p.part_base + w.slice] = s;
        }
    }
}

// The merges of the single passes in subgroups, after single.wgsl, for
// devices with wgpu's SUBGROUP feature and a fixed subgroup size SG that
// divides T (single_merge.wgsl merges through workgroup memory instead).
// Invocation `lid` of a workgroup is taken to be lane `lid % SG` of its
// subgroup `lid / SG`, as on lavapipe; the host picks these merges only
// where that was tested (src/gpu/batchnorm/single.rs).
//
// A merge adds the values of a subgroup in registers (subgroupAdd), one
// lane of each writes its subgroup's sums to a slot, and after one barrier
// each lane reads every SG-th slot of its group and the subgroup adds those
// up: one barrier and a slot or two of workgroup memory per thread, where
// single_merge.wgsl takes three barriers and a sweep of the partials.

// Invocations of a subgroup.
override SG: u32 = 8u;

// Which half of `sh` the next merge writes: merges take turns, so a merge's
// writes never meet the reads of the one before, which all come before its
// barrier.
var<private> merge_turn: u32 = 0u;

// The sum over the subgroup of the components in use (single.wgsl's sh_put).
fn subgroup_sum(v: vec4<f32>, pair: bool) -> vec4<f32> {
    if four_lanes() {
        return subgroupAdd(v);
    }
    if pair {
        return vec4(subgroupAdd(v.xy), 0.0, 0.0);
    }
    return vec4(subgroupAdd(v.x), 0.0, 0.0, 0.0);
}

// As single_merge.wgsl's group_total: the sums `v` and, `with_seen`, the OR
// of the SEEN_* words `seen` of the threads of the group, on every thread
// of the group.
fn group_total(at: Place, v: vec4<f32>, seen: u32, with_seen: bool, pair: bool) -> Total {
    let subgroups = T / SG;
    let base = (merge_turn & 1u) * (WG / 2u) + at.grp * subgroups;
    merge_turn += 1u;
    let lane = at.l % SG;
    let s = subgroup_sum(v, pair);
    var s_seen = 0u;
    if with_seen {
        s_seen = subgroupOr(seen);
    }
    if lane == 0u {
        sh_put(base + at.l / SG, s, pair);
        if with_seen {
            sh_seen[base + at.l / SG] = s_seen;
        }
    }
    workgroupBarrier();
    var t = vec4(0.0);
    var t_seen = 0u;
    for (var j = lane; j < subgroups; j += SG) {
        t += sh_get(base + j, pair);
        if with_seen {
            t_seen |= sh_seen[base + j];
        }
    }
    var out = Total(subgroup_sum(t, pair), 0u);
    if with_seen {
        out.seen = subgroupOr(t_seen);
    }
    return out;
}

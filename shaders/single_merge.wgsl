// The merges of the single passes through workgroup memory, after
// single.wgsl (single_merge_subgroup.wgsl merges in subgroups instead).
//
// Slots of `sh` and `sh_seen`: the threads' sums from AT_SUM, the partials
// of a merge from AT_PART, per group its total from AT_TOTAL.
const AT_SUM: u32 = 0u;
const AT_PART: u32 = WG;
const AT_TOTAL: u32 = WG + PARTS_MAX;

// The sums `v` (folded; without four_lanes() a `pair` in .x and .y, else
// .x alone) and, `with_seen`, the OR of the SEEN_* words `seen` of the
// threads of the group, on every thread of the group: T values into
// T / 16 partials, those into the total on the group's first thread, which
// hands it on; three barriers (two for T <= 16). A merge's slots are free
// again after the next merge's first barrier.
fn group_total(at: Place, v: vec4<f32>, seen: u32, with_seen: bool, pair: bool) -> Total {
    let parts = max(T / 16u, 1u);
    let per_part = T / parts;
    let base = at.grp * T;
    sh_put(AT_SUM + base + at.l, v, pair);
    if with_seen {
        sh_seen[AT_SUM + base + at.l] = seen;
    }
    workgroupBarrier();
    var t = Total(vec4(0.0), 0u);
    if at.l < parts {
        for (var j = 0u; j < per_part; j++) {
            t.sum += sh_get(AT_SUM + base + at.l * per_part + j, pair);
            if with_seen {
                t.seen |= sh_seen[AT_SUM + base + at.l * per_part + j];
            }
        }
        if parts > 1u {
            sh_put(AT_PART + at.grp * parts + at.l, t.sum, pair);
            if with_seen {
                sh_seen[AT_PART + at.grp * parts + at.l] = t.seen;
            }
        }
    }
    if parts > 1u {
        workgroupBarrier();
        if at.l == 0u {
            t = Total(vec4(0.0), 0u);
            for (var j = 0u; j < parts; j++) {
                t.sum += sh_get(AT_PART + at.grp * parts + j, pair);
                if with_seen {
                    t.seen |= sh_seen[AT_PART + at.grp * parts + j];
                }
            }
        }
    }
    if at.l == 0u {
        sh_put(AT_TOTAL + at.grp, t.sum, pair);
        if with_seen {
            sh_seen[AT_TOTAL + at.grp] = t.seen;
        }
    }
    workgroupBarrier();
    var out = Total(sh_get(AT_TOTAL + at.grp, pair), 0u);
    if with_seen {
        out.seen = sh_seen[AT_TOTAL + at.grp];
    }
    return out;
}

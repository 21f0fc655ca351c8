// Shared by the single-pass training forward (forward_single,
// forward_single_scalar) and backward (backward_single), after common.wgsl,
// special.wgsl and finish.wgsl, before single_merge.wgsl or
// single_merge_subgroup.wgsl (the merges). What follows describes the forward; the
// backward holds x and dy the same way and merges its two sums the same way.
//
// One dispatch does what stats_partial, stats_finalize and normalize do in
// three, for channels of at most K_MAX * 4 * WG elements: each group of T
// threads of a workgroup (WG / T groups) owns one channel (or, with
// four_lanes(), four adjacent channels: a vec4 of lanes), and each of its
// threads holds up to K items (vec4s) of it in registers, items
// `l, l + T, l + 2T, ...` of the channel for thread `l`. So x is read once:
//   1. sum of x - K over the group -> d (mean of x - K; K the channel's
//      first element),
//   2. sum of (x - K - d)^2 from the registers -> the biased variance, an
//      exact two-pass variance,
//   3. y from the registers.
// Thread k of a group leaves (K, d, var, SEEN_* bits) of its lane k's
// channel in `saved`, and single_finalize.wgsl, dispatched after, counts the
// batch, turns them into the saved statistics and moves the running
// statistics; a grid of one workgroup (ALONE) does both itself, in one
// dispatch. A group merges its threads' sums (group_total) through
// workgroup memory in three barriers, or in subgroups in one: few
// barriers, since on a CPU adapter each switches every invocation of the
// workgroup.
//
// Indices are worked out once per item and kept: a cursor moved on from
// item to item ran the pass 1.2 to 1.3 times slower on lavapipe.
//
// The host picks T and K from the shape (src/gpu/batchnorm/single.rs) and
// builds one pipeline per (ITEMS, T, K, FUSED, ALONE, EVAL; SG of
// single_merge_subgroup.wgsl) with these overrides.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> state: array<u32>;        // sections: see common.wgsl
@group(0) @binding(3) var<storage, read_write> saved: array<vec4<f32>>;  // (K, d, invstd, 0)

// Most items one thread holds.
const K_MAX: u32 = 32u;
// Items each thread holds (<= K_MAX).
override K: u32 = 1u;
// Threads per channel group: 16, 32, 64, 128 or 256.
override T: u32 = WG;
// What an item is: ITEMS_RUN4, ITEMS_LANES, ITEMS_SCALAR or ITEMS_QUADS.
override ITEMS: u32 = 0u;
// The fusion, FLAG_RESIDUAL and FLAG_RELU bits: an override rather than
// Params.flags, so that an unfused pipeline holds no code for them (a CPU
// adapter runs both sides of a branch, masked).
override FUSED: u32 = 0u;
// The forward's grid is this one workgroup: it counts the batch
// (count_alone) and finishes its channels itself (save_channel), so no
// single_finalize dispatch follows. Small tensors pay per dispatch more
// than for their traffic (BENCHMARKS.md).
override ALONE: bool = false;
// An evaluation forward (forward_single.wgsl): y from the running
// statistics, no sums, one dispatch in place of eval_coeffs and normalize.
override EVAL: bool = false;
// Four elements of one run of one channel (channels-first, runs a multiple of 4 long).
const ITEMS_RUN4: u32 = 0u;
// One element each of four adjacent channels (one element per run, C a multiple of 4).
const ITEMS_LANES: u32 = 1u;
// Four successive elements of one channel, loaded one by one (forward_single_scalar).
const ITEMS_SCALAR: u32 = 2u;
// Four successive elements of the runs of four adjacent channels, which lie
// one after the other in each sample (channels-first, C a multiple of 4,
// runs longer than 4 and not a multiple of 4 long): a lane's channel
// depends on its place in the run (single_vec4.wgsl).
const ITEMS_QUADS: u32 = 3u;

// Whether a group holds four adjacent channels, one a lane of its sums.
fn four_lanes() -> bool {
    return ITEMS == ITEMS_LANES || ITEMS == ITEMS_QUADS;
}

const PARTS_MAX: u32 = WG / 16u;

// Workgroup memory of the merges (single_merge.wgsl,
// single_merge_subgroup.wgsl), one vec4 of sums and a SEEN_* word a slot.
// Sums of one channel use lane .x (and .y for a pair) alone: a CPU adapter
// pays workgroup memory by the component accessed, and every invocation
// pays for a branch that one of them takes.
var<workgroup> sh: array<vec4<f32>, WG + 2u * PARTS_MAX>;
var<workgroup> sh_seen: array<u32, WG + 2u * PARTS_MAX>;

// Where a thread works.
struct Place {
    grp: u32,  // its group in the workgroup
    l: u32,    // its place in the group
    g: u32,    // the group's channel (four_lanes(): block of four channels)
    live: bool // the channel is in the tensor
}

fn place(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Place {
    let grp = lid / T;
    let g = linear_workgroup(wid, nwg) * (WG / T) + grp;
    var groups = p.channels;
    if four_lanes() {
        groups = p.channels / 4u;
    }
    return Place(grp, lid - grp * T, g, g < groups);
}

// With ALONE: counts the batch (FLAG_UPDATE_RUNNING) before any channel of
// the workgroup reads the step's momentum factor. Every invocation calls it
// first.
fn count_alone(lid: u32) {
    if ALONE {
        if lid == 0u && (p.flags & FLAG_UPDATE_RUNNING) != 0u {
            count_batch_now();
        }
        storageBarrier();
    }
}

// Channels of a group.
fn lanes() -> u32 {
    if four_lanes() {
        return 4u;
    }
    return 1u;
}

// The per-lane sums of a thread as the group merges them: per lane for
// four_lanes() (four channels), else the lanes added up into .x (one channel).
fn fold(s: vec4<f32>) -> vec4<f32> {
    if four_lanes() {
        return s;
    }
    return vec4(s.x + s.y + s.z + s.w, 0.0, 0.0, 0.0);
}

// A thread's SEEN_* bits as one word: three bits per lane for four_lanes(),
// else the lanes' together (one channel).
fn pack_seen(seen: vec4<u32>) -> u32 {
    if four_lanes() {
        return seen.x | (seen.y << 3u) | (seen.z << 6u) | (seen.w << 9u);
    }
    return seen.x | seen.y | seen.z | seen.w;
}

// The SEEN_* bits of lane `k` of a packed word.
fn lane_seen(packed: u32, k: u32) -> u32 {
    if four_lanes() {
        return (packed >> (3u * k)) & 7u;
    }
    return packed;
}

// Slot `i` of `sh` is written and read by the components in use: all four
// lanes for four_lanes(), else .x, or .x and .y for a `pair` of sums.
fn sh_put(i: u32, v: vec4<f32>, pair: bool) {
    if four_lanes() {
        sh[i] = v;
    } else {
        sh[i].x = v.x;
        if pair {
            sh[i].y = v.y;
        }
    }
}

fn sh_get(i: u32, pair: bool) -> vec4<f32> {
    if four_lanes() {
        return sh[i];
    }
    if pair {
        return vec4(sh[i].x, sh[i].y, 0.0, 0.0);
    }
    return vec4(sh[i].x, 0.0, 0.0, 0.0);
}

// A value per lane of the group from merged sums `v` (one channel: its .x
// on every lane).
fn on_lanes(v: vec4<f32>) -> vec4<f32> {
    if four_lanes() {
        return v;
    }
    return vec4(v.x);
}

// A group's merged sums and (with `with_seen`) SEEN_* bits, from
// group_total (single_merge.wgsl or single_merge_subgroup.wgsl).
struct Total {
    sum: vec4<f32>,
    seen: u32,
}

// d: the mean of x - K of the group's lanes, from the sums `s` of x - K of
// its threads, and the group's SEEN_* word (from the threads' `seen`), on
// every thread of the group.
struct Mean {
    d: vec4<f32>,
    seen: u32,
}

fn group_mean(at: Place, s: vec4<f32>, seen: vec4<u32>) -> Mean {
    let t = group_total(at, fold(s), pack_seen(seen), true, false);
    return Mean(on_lanes(t.sum * p.inv_m), t.seen);
}

// The channel of lane `q` of group `g`.
fn lane_channel(g: u32, q: u32) -> u32 {
    if four_lanes() {
        return g * 4u + q;
    }
    return g;
}

// The normalize step of the group's lanes: y = (v - center) * scale + shift
// for values v of x (EVAL), or of x - K (the training forward: center 0).
struct Coefs {
    center: vec4<f32>,
    scale: vec4<f32>,
    shift: vec4<f32>,
}

// The coefficients of the group's lanes for values of x - K (center 0), on
// every thread of the group, from `mean` and the sums `q` of (x - K - d)^2
// of its threads. Thread k of the group writes (K, d, var, SEEN_* bits) of
// its lane k's channel into `saved`, for single_finalize.wgsl (with ALONE
// it finishes the channel itself): a CPU adapter runs a branch's code on
// every thread, masked, so one thread per channel costs a store of one
// channel, not of four.
fn group_coefs(at: Place, shift: vec4<f32>, mean: Mean, q: vec4<f32>) -> Coefs {
    let t = group_total(at, fold(q), 0u, false, false);
    let var_biased = on_lanes(t.sum * p.inv_m);
    // thread k of the group saves lane k's channel
    if at.live && at.l < lanes() {
        let k = at.l;
        let c = lane_channel(at.g, k);
        let seen = lane_seen(mean.seen, k);
        if ALONE {
            save_channel(c, shift[k], mean.d[k], var_biased[k], invstd_of(var_biased[k]), seen);
        } else {
            saved[c] = vec4(shift[k], mean.d[k], var_biased[k], bitcast<f32>(seen));
        }
    }
    var out = Coefs(vec4(0.0), vec4(0.0), vec4(0.0));
    for (var k = 0u; k < lanes(); k++) {
        let invstd = invstd_of(var_biased[k]);
        let co = coef_of(lane_channel(at.g, k), shift[k], mean.d[k], invstd, lane_seen(mean.seen, k));
        out.scale[k] = co.y;
        out.shift[k] = co.z;
    }
    if lanes() == 1u {
        out = Coefs(vec4(0.0), vec4(out.scale.x), vec4(out.shift.x));
    }
    return out;
}

// With EVAL: the coefficients of the group's lanes from the running
// statistics (as eval_coeffs.wgsl), and the group's first thread saves
// (running_mean, 0, invstd) per channel for a backward of this forward.
fn eval_coefs(at: Place) -> Coefs {
    var out: Coefs;
    if !at.live {
        return out;
    }
    let s = p.state_stride;
    for (var k = 0u; k < lanes(); k++) {
        let c = lane_channel(at.g, k);
        let mean = state_f32(RUNNING_MEAN * s + c);
        let root = sqrt(state_f32(RUNNING_VAR * s + c) + p.eps);
        if at.l == 0u {
            saved[c] = vec4<f32>(mean, 0.0, 1.0 / root, 0.0);
        }
        out.center[k] = mean;
        out.scale[k] = state_f32(WEIGHT * s + c) / root;
        out.shift[k] = state_f32(BIAS * s + c);
    }
    if lanes() == 1u {
        out = Coefs(vec4(out.center.x), vec4(out.scale.x), vec4(out.shift.x));
    }
    return out;
}

// `y` of a vec4 of `x` with the group's coefficients, fused with `z`
// (FLAG_RESIDUAL in FUSED) and the ReLU (FLAG_RELU in FUSED).
fn output(v: vec4<f32>, k: Coefs, z: vec4<f32>) -> vec4<f32> {
    var y = (v - k.center) * k.scale + k.shift;
    if (FUSED & FLAG_RESIDUAL) != 0u {
        y += z;
    }
    if (FUSED & FLAG_RELU) != 0u {
        y = relu4(y);
    }
    return y;
}

// Shared by the single-pass training forward (forward_single,
// forward_single_scalar) and backward (backward_single), after common.wgsl,
// special.wgsl and finish.wgsl. What follows describes the forward; the
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
// The group's first thread leaves (K, d, var, SEEN_* bits) in `saved`, and
// single_finalize.wgsl, dispatched after, counts the batch, turns them into
// the saved statistics and moves the running statistics; a grid of one
// workgroup (ALONE) does both itself, in one dispatch. A group merges its
// threads' sums in two steps through workgroup memory (T values into T / 16
// partials, then those), few barriers: on a CPU adapter each barrier
// switches every invocation of the workgroup.
//
// Indices are worked out once per item and kept: a cursor moved on from
// item to item ran the pass 1.2 to 1.3 times slower on lavapipe.
//
// The host picks T and K from the shape (src/gpu/batchnorm/single.rs) and
// builds one pipeline per (ITEMS, T, K, FUSED, ALONE, EVAL) with these
// overrides.

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

// The threads' sums and SEEN_* bits, then the partials of a merge; per
// group its d, then its variance and SEEN_* bits. Sums of one
// channel use lane .x alone: a CPU adapter pays workgroup memory by the
// component accessed.
var<workgroup> sh_sum: array<vec4<f32>, WG>;
var<workgroup> sh_seen: array<u32, WG>;
var<workgroup> sh_part: array<vec4<f32>, PARTS_MAX>;
var<workgroup> sh_part_seen: array<u32, PARTS_MAX>;
var<workgroup> sh_res: array<vec4<f32>, PARTS_MAX>;
var<workgroup> sh_res_seen: array<u32, PARTS_MAX>;

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

// Workgroup memory is written and read by the components in use: all four
// lanes for four_lanes(), else .x, or .x and .y for a `pair` of sums (a CPU
// adapter pays workgroup memory by the component accessed).
fn put_sum(i: u32, v: vec4<f32>, pair: bool) {
    if four_lanes() {
        sh_sum[i] = v;
    } else {
        sh_sum[i].x = v.x;
        if pair {
            sh_sum[i].y = v.y;
        }
    }
}

fn get_sum(i: u32, pair: bool) -> vec4<f32> {
    if four_lanes() {
        return sh_sum[i];
    }
    if pair {
        return vec4(sh_sum[i].x, sh_sum[i].y, 0.0, 0.0);
    }
    return vec4(sh_sum[i].x, 0.0, 0.0, 0.0);
}

fn put_part(i: u32, v: vec4<f32>, pair: bool) {
    if four_lanes() {
        sh_part[i] = v;
    } else {
        sh_part[i].x = v.x;
        if pair {
            sh_part[i].y = v.y;
        }
    }
}

fn get_part(i: u32, pair: bool) -> vec4<f32> {
    if four_lanes() {
        return sh_part[i];
    }
    if pair {
        return vec4(sh_part[i].x, sh_part[i].y, 0.0, 0.0);
    }
    return vec4(sh_part[i].x, 0.0, 0.0, 0.0);
}

// A group's merged sums and (with `with_seen`) SEEN_* bits.
struct Total {
    sum: vec4<f32>,
    seen: u32,
}

// The sums `v` (folded; without four_lanes() a `pair` in .x and .y, else
// .x alone) and, `with_seen`, the OR of the SEEN_* words `seen` of the
// threads of the group, on its first thread (`l` = 0); in one barrier for
// T <= 16, else two (T values into T / 16 partials, then those). Its
// workgroup memory is free again after a barrier.
fn group_total(at: Place, v: vec4<f32>, seen: u32, with_seen: bool, pair: bool) -> Total {
    let parts = max(T / 16u, 1u);
    let per_part = T / parts;
    let base = at.grp * T;
    put_sum(base + at.l, v, pair);
    if with_seen {
        sh_seen[base + at.l] = seen;
    }
    workgroupBarrier();
    var t = Total(vec4(0.0), 0u);
    if at.l < parts {
        for (var j = 0u; j < per_part; j++) {
            t.sum += get_sum(base + at.l * per_part + j, pair);
            if with_seen {
                t.seen |= sh_seen[base + at.l * per_part + j];
            }
        }
        if parts > 1u {
            put_part(at.grp * parts + at.l, t.sum, pair);
            if with_seen {
                sh_part_seen[at.grp * parts + at.l] = t.seen;
            }
        }
    }
    if parts > 1u {
        workgroupBarrier();
        if at.l == 0u {
            t = Total(vec4(0.0), 0u);
            for (var j = 0u; j < parts; j++) {
                t.sum += get_part(at.grp * parts + j, pair);
                if with_seen {
                    t.seen |= sh_part_seen[at.grp * parts + j];
                }
            }
        }
    }
    return t;
}

// d: the mean of x - K of the group's lanes, from the sums `s` of x - K of
// its threads, on every thread of the group; with the group's SEEN_* word
// (from the threads' `seen`) on its first thread.
struct Mean {
    d: vec4<f32>,
    seen: u32,
}

fn group_mean(at: Place, s: vec4<f32>, seen: vec4<u32>) -> Mean {
    let t = group_total(at, fold(s), pack_seen(seen), true, false);
    if at.l == 0u {
        var d = t.sum * p.inv_m;
        if !four_lanes() {
            d = vec4(d.x);
        }
        sh_res[at.grp] = d;
    }
    workgroupBarrier();
    return Mean(sh_res[at.grp], t.seen);
}

// The channel of lane `q` of group `g`.
fn lane_channel(g: u32, q: u32) -> u32 {
    if four_lanes() {
        return g * 4u + q;
    }
    return g;
}

// The normalize step of the group's lanes: y = (x - center) * scale + shift.
struct Coefs {
    center: vec4<f32>,
    scale: vec4<f32>,
    shift: vec4<f32>,
}

// The coefficients of the group's lanes, on every thread of the group, from
// `mean` and the sums `q` of (x - K - d)^2 of its threads. The group's
// first thread merges the sums into the biased variance and writes
// (K, d, var, SEEN_* bits) of each lane's channel into `saved`, for
// single_finalize.wgsl; every thread then works out the coefficients (a CPU
// adapter runs a branch's code on every thread, masked, so the first
// thread alone would cost as much).
fn group_coefs(at: Place, shift: vec4<f32>, mean: Mean, q: vec4<f32>) -> Coefs {
    let t = group_total(at, fold(q), 0u, false, false);
    if at.l == 0u {
        sh_res[at.grp] = t.sum * p.inv_m;
        sh_res_seen[at.grp] = mean.seen;
        if at.live {
            for (var k = 0u; k < lanes(); k++) {
                let c = lane_channel(at.g, k);
                let var_biased = t.sum[k] * p.inv_m;
                let seen = lane_seen(mean.seen, k);
                if ALONE {
                    save_channel(c, shift[k], mean.d[k], var_biased, invstd_of(var_biased), seen);
                } else {
                    saved[c] = vec4(shift[k], mean.d[k], var_biased, bitcast<f32>(seen));
                }
            }
        }
    }
    workgroupBarrier();
    let var_biased = sh_res[at.grp];
    let seen = sh_res_seen[at.grp];
    var out: Coefs;
    for (var k = 0u; k < lanes(); k++) {
        let invstd = invstd_of(var_biased[k]);
        let co = coef_of(lane_channel(at.g, k), shift[k], mean.d[k], invstd, lane_seen(seen, k));
        out.center[k] = co.x;
        out.scale[k] = co.y;
        out.shift[k] = co.z;
    }
    if lanes() == 1u {
        out = Coefs(vec4(out.center.x), vec4(out.scale.x), vec4(out.shift.x));
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

// Shared by the reduction passes (stats_partial, stats_partial_vec4,
// backward_partial, backward_partial_vec4), after common.wgsl and special.wgsl.
//
// The grid of a reduction (`ReduceGrid` in src/gpu/batchnorm/grid.rs): the
// tensor is `outer` rows of `p.red_cols` columns of runs of `p.red_inner`
// contiguous items (an item a single element or a vec4), so that item
// (o, col, i) lies at `(o * red_cols + col) * red_inner + i`. A column is one
// channel, or, channels-last with C a multiple of 4, a vec4 of four adjacent
// channels (FLAG_LANE_CHANNELS). A channel's items form a sequence of
// positions `o * red_inner + i`, cut into `p.slices` slices.
//
// A workgroup owns one slice of a block of `p.red_tx` adjacent columns, with
// `WG / red_tx` threads per column that walk the slice's positions, each
// from its own first position on, `WG / red_tx` apart. Channels-first
// (`p.red_major` = 1, column-major) the threads of a column are neighbours
// and read neighbouring items of a run; channels-last (row-major) the
// threads of a row are neighbours and read neighbouring columns. No thread
// divides per element: it finds its first position's (o, i) once and then
// steps through them by additions.
//
// Each thread keeps four Welford streams (or four pairs of sums), one per
// lane of a vec4, with one count for all four: one divide per vec4, not per
// element. The workgroup then merges its threads column by column in
// workgroup memory with Chan's formula.

var<workgroup> sh_n: array<f32, WG>;
var<workgroup> sh_a: array<f32, WG>;
var<workgroup> sh_b: array<f32, WG>;
var<workgroup> sh_f: array<u32, WG>;

// Where one thread of a reduction works.
struct RedWalk {
    col: u32,   // its column
    live: bool, // the column is inside the tensor
    begin: u32, // its first position
    end: u32,   // the slice's end
    step: u32,  // positions between its steps
    slice: u32, // the slice
    lead: bool, // the first thread of its column: writes the partial
}

// The walk of thread `lid`, with `per_pos` elements of a channel per position
// (4 for vec4 items of one channel, else 1).
fn red_walk(p: Params, wid: vec3<u32>, nwg: vec3<u32>, lid: u32, per_pos: u32) -> RedWalk {
    let g = linear_workgroup(wid, nwg);
    let block = g / p.slices;
    let s = g - block * p.slices;
    let per_col = WG / p.red_tx;
    var cx = lid % p.red_tx;
    var ty = lid / p.red_tx;
    if p.red_major != 0u {
        cx = lid / per_col;
        ty = lid % per_col;
    }
    let col = block * p.red_tx + cx;
    let begin = s * (p.slice_len / per_pos);
    let end = begin + slice_count(p, s) / per_pos;
    return RedWalk(col, col < p.red_cols, begin + ty, end, per_col, s, ty == 0u);
}

// The merge steps of a workgroup: partners `stride` apart for `stride` from
// `top` down to `stop`, a thread merging in its partner when `lid & mask`
// is below `stride`; afterwards the first thread of each column holds the
// column's total.
struct Tree {
    top: u32,
    stop: u32,
    mask: u32,
}

fn red_tree(p: Params) -> Tree {
    if p.red_major != 0u {
        let per_col = WG / p.red_tx;
        return Tree(per_col / 2u, 1u, per_col - 1u);
    }
    return Tree(WG / 2u, p.red_tx, WG - 1u);
}

// A position as (run, item in the run).
struct Cursor {
    o: u32,
    i: u32,
}

fn cursor(p: Params, pos: u32) -> Cursor {
    let o = pos / p.red_inner;
    return Cursor(o, pos - o * p.red_inner);
}

// `at` moved on by a step of `dq * red_inner + dr` positions (dr < red_inner).
fn advance(p: Params, at: Cursor, dq: u32, dr: u32) -> Cursor {
    var o = at.o + dq;
    var i = at.i + dr;
    if i >= p.red_inner {
        i -= p.red_inner;
        o += 1u;
    }
    return Cursor(o, i);
}

// Index of the item at `at` in column `col`.
fn item_index(p: Params, at: Cursor, col: u32) -> u32 {
    return (at.o * p.red_cols + col) * p.red_inner + at.i;
}

// Four successive positions of a thread's walk: the index of each item, 0
// where `live` is false (past the slice's end, only at a walk's last step).
struct Quad {
    idx: vec4<u32>,
    live: vec4<bool>,
}

// The item index at `*pos`, 0 past `w.end`; moves `*pos` and `*at` one step on.
fn take(p: Params, pos: ptr<function, u32>, at: ptr<function, Cursor>, w: RedWalk, dq: u32, dr: u32) -> u32 {
    let idx = select(0u, item_index(p, *at, w.col), *pos < w.end);
    *at = advance(p, *at, dq, dr);
    *pos = next_pos(*pos, w.end, w.step);
    return idx;
}

// The next four positions from `*pos` (at `*at`), with no branch and no
// dynamic lane index, for the kernels that read single elements.
fn quad(p: Params, pos: ptr<function, u32>, at: ptr<function, Cursor>, w: RedWalk, dq: u32, dr: u32) -> Quad {
    let left = select(0u, w.end - *pos, *pos < w.end);
    let live = vec4(left > 0u, left > w.step, left > 2u * w.step, left > 3u * w.step);
    let i0 = take(p, pos, at, w, dq, dr);
    let i1 = take(p, pos, at, w, dq, dr);
    let i2 = take(p, pos, at, w, dq, dr);
    let i3 = take(p, pos, at, w, dq, dr);
    return Quad(vec4(i0, i1, i2, i3), live);
}

// The position after `pos`, or `end` when the step would reach or pass it (no
// wrap past 2^32 - 1).
fn next_pos(pos: u32, end: u32, step: u32) -> u32 {
    return select(end, pos + step, end - pos > step);
}

// Non-finite values (the SEEN_* bits of special.wgsl, which goes before
// this part) stay out of Welford's sums, and stats_finalize gives the
// channel PyTorch's statistics for them.

// Count, mean (of x - K), M2 and SEEN_* bits of a set of values.
struct Moments {
    n: f32,
    mean: f32,
    m2: f32,
    seen: u32,
}

// Chan's merge of two sets.
fn chan(a: Moments, b: Moments) -> Moments {
    if b.n == 0.0 {
        return Moments(a.n, a.mean, a.m2, a.seen | b.seen);
    }
    let n = a.n + b.n;
    let f = b.n / n;
    let d = b.mean - a.mean;
    return Moments(n, a.mean + d * f, a.m2 + b.m2 + d * d * (a.n * f), a.seen | b.seen);
}

// Four Welford streams that take their values together: `steps` values each,
// of which `kept` per lane are values inside the slice. A lane leaves out a
// value by taking its own mean (no change), which keeps the shared count
// right while the values it leaves out are the slice's tail. Non-finite
// values enter their lane's stream like the others: the largest bits of
// each lane (`ext`, special.wgsl) tell which ones a lane met, and its
// channel's statistics then come from its SEEN_* bits, whatever the stream
// holds. Two integer maxima a value: telling each value apart as it comes
// cost the statistics pass more than its Welford step (BENCHMARKS.md).
struct Lanes {
    steps: f32,
    kept: vec4<f32>,
    mean: vec4<f32>,
    m2: vec4<f32>,
    ext: Extremes,
}

fn lanes_new() -> Lanes {
    return Lanes(0.0, vec4(0.0), vec4(0.0), vec4(0.0), extremes_new());
}

// One step of the four streams: `raw` where `live`, shifted by `shift`.
fn lanes_step(st: ptr<function, Lanes>, raw: vec4<f32>, live: vec4<bool>, shift: vec4<f32>) {
    (*st).ext = extremes_add((*st).ext, select(vec4(0.0), raw, live));
    (*st).steps += 1.0;
    let inv = 1.0 / (*st).steps;
    let mean = (*st).mean;
    let v = select(mean, raw - shift, live);
    let d = v - mean;
    let next = mean + d * inv;
    (*st).mean = next;
    (*st).m2 += d * (v - next);
    (*st).kept += select(vec4(0.0), vec4(1.0), live);
}

// Lane `k` of the streams on its own.
fn lane(st: Lanes, k: u32) -> Moments {
    return Moments(st.kept[k], st.mean[k], st.m2[k], extremes_seen(st.ext)[k]);
}

// The four lanes merged (they hold values of one channel).
fn lanes_merged(st: Lanes) -> Moments {
    return chan(chan(lane(st, 0u), lane(st, 1u)), chan(lane(st, 2u), lane(st, 3u)));
}

// Merges the moments of the threads of each column along `t`: on return, the
// first thread of each column holds the column's. `t` must be the same for
// the whole workgroup.
fn tree_moments(lid: u32, m: Moments, t: Tree) -> Moments {
    sh_n[lid] = m.n;
    sh_a[lid] = m.mean;
    sh_b[lid] = m.m2;
    sh_f[lid] = m.seen;
    workgroupBarrier();
    for (var stride = t.top; stride >= t.stop; stride >>= 1u) {
        if (lid & t.mask) < stride {
            let r = chan(
                Moments(sh_n[lid], sh_a[lid], sh_b[lid], sh_f[lid]),
                Moments(sh_n[lid + stride], sh_a[lid + stride], sh_b[lid + stride], sh_f[lid + stride]),
            );
            sh_n[lid] = r.n;
            sh_a[lid] = r.mean;
            sh_b[lid] = r.m2;
            sh_f[lid] = r.seen;
        }
        workgroupBarrier();
    }
    // A later call's writes are each thread's own slot: no barrier needed.
    return Moments(sh_n[lid], sh_a[lid], sh_b[lid], sh_f[lid]);
}

// Sums the pairs of the threads of each column, as tree_moments.
fn tree_sums(lid: u32, s: vec2<f32>, t: Tree) -> vec2<f32> {
    sh_a[lid] = s.x;
    sh_b[lid] = s.y;
    workgroupBarrier();
    for (var stride = t.top; stride >= t.stop; stride >>= 1u) {
        if (lid & t.mask) < stride {
            sh_a[lid] += sh_a[lid + stride];
            sh_b[lid] += sh_b[lid + stride];
        }
        workgroupBarrier();
    }
    return vec2(sh_a[lid], sh_b[lid]);
}

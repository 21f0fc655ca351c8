// Shared by every kernel: prepended to each shader file by src/shaders.rs,
// after a storage prelude that defines how the big tensors (x, z, y, dy, dx,
// dz) are stored. Their arrays hold storage words, `Elem` (single-element
// kernels) or `Elem4` (vec4 kernels), with `PER_WORD` elements in an `Elem`:
//   f32 storage          Elem = f32, ElemF = f32        Elem4 = vec4<f32>   PER_WORD = 1
//   f16 (`enable f16;`)  Elem = f16, ElemF = f32        Elem4 = vec4<f16>   PER_WORD = 1
//   packed f16           Elem = u32, ElemF = vec2<f32>  Elem4 = vec2<u32>   PER_WORD = 2
// Packed f16 is the f16 layout in core WGSL, for devices without SHADER_F16:
// the same bytes, read as u32 words of two f16 values (the first element in
// the low half). Kernels widen a word to f32 with `load` (to `ElemF`, one
// f32 per element) or `load4` (to vec4<f32>) and narrow with `store` or
// `store4`, so they compute in f32 for every storage type; `elem_of(w, i)`
// is element `i`'s value in its widened word `w` (word `i / PER_WORD`),
// `pair(a, b)` the `ElemF` of a word whose elements take `a` and `b`, and
// `store_first(v, old)` the word of a tensor's odd last element: its first
// half from `v`, its second half, past the tensor's end, the bits of `old`.
// A kernel that writes single elements writes whole words: with packed f16
// the thread of a word's first element computes and writes both of its
// elements (see normalize.wgsl), so that no two threads write one word.
//
// src/shaders.rs also prepends the constants WG (threads per workgroup of the
// kernels that walk the big tensors), WG_CHANNEL (of the per-channel kernels),
// FLAG_UPDATE_RUNNING, FLAG_BATCH_STATS, FLAG_CUMULATIVE, FLAG_LANE_CHANNELS,
// FLAG_RESIDUAL and FLAG_RELU (bits of Params.flags), so that Rust and WGSL
// share one definition of each.
//
// A layer keeps everything per channel that outlives a call in one `state`
// buffer of sections, each `state_stride` elements apart (a stride that keeps
// every section at the device's storage offset alignment, so that each is
// also a tensor an app can bind): weight, bias, running_mean, running_var,
// dweight, dbias (f32), and the counter section (u32): num_batches_tracked as
// (low, high) words and the bits of the f32 momentum factor of the last
// training step.
//
// Keep `Params` in sync with `Params` in src/gpu/kernels.rs.
struct Params {
    channels: u32,     // C
    outer: u32,        // runs per channel: N (channels-first) or N*spatial (channels-last)
    inner: u32,        // contiguous elements per run: spatial (channels-first) or 1
    total: u32,        // elements in the tensor
    slices: u32,       // partial reductions per channel
    slice_len: u32,    // elements of a channel per slice
    per_channel: u32,  // M = outer * inner
    flags: u32,        // FLAG_* bits
    eps: f32,
    momentum: f32,     // the configured factor (PyTorch convention); unused with FLAG_CUMULATIVE
    unbias: f32,       // M / (M - 1)
    inv_m: f32,        // 1 / M
    state_stride: u32, // elements between the sections of `state`
    band: u32,         // elementwise passes: items (vec4 or scalar) per band, whole rows
    steps: u32,        // elementwise passes: bands one thread walks
    band_cols: u32,    // elementwise passes: workgroups across one band
    red_cols: u32,     // reductions: columns of a row, in items (see reduce.wgsl)
    red_inner: u32,    // reductions: items per run of a column
    red_tx: u32,       // reductions: columns of a workgroup's block
    red_major: u32,    // reductions: 1 when a column's threads are neighbours (column-major)
    chunk_m: u32,      // elements of a channel in each bound chunk of rows but the last
    part_base: u32,    // reductions: the partial slot of this chunk's first slice
    part_stride: u32,  // partial slots per channel, all chunks together
    pad0: u32,
}

// Sections of the `state` buffer (times Params.state_stride).
const WEIGHT: u32 = 0u;
const BIAS: u32 = 1u;
const RUNNING_MEAN: u32 = 2u;
const RUNNING_VAR: u32 = 3u;
const DWEIGHT: u32 = 4u;
const DBIAS: u32 = 5u;
const COUNTER: u32 = 6u;
// Words of the counter section.
const BATCHES_LOW: u32 = 0u;
const BATCHES_HIGH: u32 = 1u;
const MOMENTUM_BITS: u32 = 2u;

// Workgroups are dispatched on a 2-D grid when one dimension is not enough.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The grid of the elementwise passes (`ElementGrid` in src/gpu/batchnorm/mod.rs).
// Their items (vec4s, or single elements) form rows of `row` items, a row
// being `C * inner` elements: one sample (channels-first) or one position
// (channels-last), so an item's place in its row fixes its channel(s). Rows
// are grouped into bands of `p.band` items; workgroup `w` covers the WG
// positions `(w % band_cols) * WG ...` of a band, in the `p.steps` bands from
// `(w / band_cols) * steps` on. A thread works out its channels once and then
// walks its bands with a stride of `p.band` items, dividing nothing.
struct BandWalk {
    first: u32, // the thread's first item (>= the item count: nothing to do)
    pos: u32,   // its place in its row, in items
    owns: bool, // the thread has a position in the band
}

fn band_walk(p: Params, wid: vec3<u32>, nwg: vec3<u32>, lid: u32, row: u32) -> BandWalk {
    let w = linear_workgroup(wid, nwg);
    let group = w / p.band_cols;
    let j0 = (w - group * p.band_cols) * WG + lid;
    return BandWalk(group * p.steps * p.band + j0, j0 % row, j0 < p.band);
}

// Elements of a channel in slice `s` (counting every chunk's slices in turn):
// a tensor larger than one storage binding is bound in chunks of whole rows,
// each `chunk_m` elements of a channel but the last, each cut into slices of
// `slice_len` from its start.
fn slice_count(p: Params, s: u32) -> u32 {
    let per_chunk = (p.chunk_m + p.slice_len - 1u) / p.slice_len;
    let chunk = s / per_chunk;
    let m = min(p.chunk_m, p.per_channel - chunk * p.chunk_m);
    let begin = (s - chunk * per_chunk) * p.slice_len;
    return min(p.slice_len, m - begin);
}

// PyTorch's ReLU of the elements of a widened word, max(v, 0) with NaN
// kept, told apart by the bits of v (a negative non-NaN value lies in
// 0x80000000..=0xff800000, -0 to -inf): WGSL lets a driver assume
// comparisons never meet NaN (see reduce.wgsl).
fn relu(v: ElemF) -> ElemF {
    let b = bitcast<ElemU>(v);
    return select(v, ElemF(0.0), (b >= ElemU(0x80000000u)) & (b <= ElemU(0xff800000u)));
}

fn relu4(v: vec4<f32>) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(v);
    return select(v, vec4(0.0), (b >= vec4(0x80000000u)) & (b <= vec4(0xff800000u)));
}

// The channels of the elements of the storage word that begins at position
// `pos` of its row (single-element kernels): the element's own, and with
// packed f16 the next position's (the first of the next row after a row's
// last); a word of one element names its channel twice.
fn word_channels(p: Params, pos: u32) -> vec2<u32> {
    var next = pos;
    if PER_WORD == 2u {
        next = select(pos + 1u, 0u, pos + 1u == p.channels * p.inner);
    }
    return vec2(pos, next) / p.inner;
}

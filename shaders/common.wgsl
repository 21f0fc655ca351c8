// Shared by every kernel: prepended to each shader file by src/shaders.rs,
// after a storage prelude that defines the element type of the big tensors
// (x, y, dy, dx): `alias Elem = f32; alias Elem4 = vec4<f32>;`, or with
// `enable f16;` the same for f16. Kernels load with `f32(...)` and store with
// `Elem(...)`, so they accumulate in f32 for either storage type.
//
// src/shaders.rs also prepends the constants WG (threads per workgroup of the
// kernels that walk the big tensors), WG_CHANNEL (of the per-channel kernels),
// FLAG_UPDATE_RUNNING and FLAG_BATCH_STATS (bits of Params.flags), so that
// Rust and WGSL share one definition of each.
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
    flags: u32,        // FLAG_UPDATE_RUNNING | FLAG_BATCH_STATS
    eps: f32,
    momentum: f32,     // factor of this step (PyTorch convention)
    unbias: f32,       // M / (M - 1)
    inv_m: f32,        // 1 / M
}

// Workgroups are dispatched on a 2-D grid when one dimension is not enough.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Flat index of element `m` (0..M) of channel `c`.
fn element_index(p: Params, c: u32, m: u32) -> u32 {
    let o = m / p.inner;
    let i = m - o * p.inner;
    return (o * p.channels + c) * p.inner + i;
}

// Channel of flat index `idx`.
fn channel_of(p: Params, idx: u32) -> u32 {
    return (idx / p.inner) % p.channels;
}

// Elements in slice `s` of a channel.
fn slice_count(p: Params, s: u32) -> u32 {
    let begin = s * p.slice_len;
    return min(p.slice_len, p.per_channel - begin);
}


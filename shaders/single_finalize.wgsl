// After the single-pass forward (forward_single*): counts the batch (with
// FLAG_UPDATE_RUNNING) and, per channel, turns the (K, d, var, SEEN_* bits)
// it left in `saved` into the saved statistics (K, d, invstd) and moves the
// running statistics (finish.wgsl). One workgroup, so that its first thread
// counts the batch before any channel reads the step's momentum factor.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;        // sections: see common.wgsl
@group(0) @binding(2) var<storage, read_write> saved: array<vec4<f32>>;  // (K, d, var, SEEN_* bits) -> (K, d, invstd, 0)

@compute @workgroup_size(WG_CHANNEL)
fn main(@builtin(local_invocation_index) lid: u32) {
    if lid == 0u && (p.flags & FLAG_UPDATE_RUNNING) != 0u {
        count_batch_now();
    }
    storageBarrier();
    for (var c = lid; c < p.channels; c += WG_CHANNEL) {
        let s = saved[c];
        let var_biased = s.z;
        save_channel(c, s.x, s.y, var_biased, invstd_of(var_biased), bitcast<u32>(s.w));
    }
}

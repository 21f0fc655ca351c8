// Counting a training batch, shared by the kernels that do it (the
// statistics passes through stats_io.wgsl, and single_finalize.wgsl after
// the single-pass forward), after common.wgsl. The kernel declares `p` and
// `state`, the layer's state read as u32 words.

// Counts the batch in num_batches_tracked and stores the momentum factor of
// this step, for the passes after it: Params.momentum, or
// 1 / num_batches_tracked with FLAG_CUMULATIVE (PyTorch counts the batch
// before it computes the factor). One thread of one dispatch calls it.
fn count_batch_now() {
    let at = COUNTER * p.state_stride;
    let low = state[at + BATCHES_LOW] + 1u;
    state[at + BATCHES_LOW] = low;
    if low == 0u {
        state[at + BATCHES_HIGH] += 1u;
    }
    var k = p.momentum;
    if (p.flags & FLAG_CUMULATIVE) != 0u {
        k = 1.0 / (f32(state[at + BATCHES_HIGH]) * 4294967296.0 + f32(low));
    }
    state[at + MOMENTUM_BITS] = bitcast<u32>(k);
}

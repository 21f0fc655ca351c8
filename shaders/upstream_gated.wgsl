// How the backward reductions of a fused backward (backward_partial_gated,
// backward_partial_vec4_gated) read their upstream gradient: `dy`, with
// FLAG_RELU gated by the fused forward's output `y` (zero where `y <= 0`, a
// NaN `y` letting `dy` through: PyTorch's threshold_backward), written to
// `gated` as it is read: the residual's gradient `dz`, or `dx` as scratch
// that the dx pass reads back (upstream_in_place.wgsl). Put after the item
// types (see upstream.wgsl); upstream.wgsl is the plain counterpart.
@group(0) @binding(2) var<storage, read> dy: array<Item>;
@group(0) @binding(5) var<storage, read> y: array<Item>;
@group(0) @binding(6) var<storage, read_write> gated: array<Item>;

// The gated upstream gradient of item `w`, widened to f32, stored to
// `gated` when `write` (the kernel's thread that owns the item: one per
// item; the second half of a packed word past the tensor's end keeps its bits).
fn upstream(w: u32, write: bool) -> ItemF {
    var g = load_item(dy[w]);
    if (p.flags & FLAG_RELU) != 0u {
        // y <= 0: +0, or the bits of -0 to -inf (relu in common.wgsl): told
        // apart by the bits, not by comparisons a driver may assume NaN-free
        let b = bitcast<ItemU>(load_item(y[w]));
        let stop = (b == ItemU(0u)) | ((b >= ItemU(0x80000000u)) & (b <= ItemU(0xff800000u)));
        g = select(g, ItemF(0.0), stop);
    }
    if write {
        if !ITEM_CUT || w < p.total / ITEM_ELEMS {
            gated[w] = store_item(g);
        } else {
            gated[w] = store_item_first(g, gated[w]);
        }
    }
    return g;
}

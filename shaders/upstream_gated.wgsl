// How the backward reductions of a fused backward (backward_partial_gated,
// backward_partial_vec4_gated) read their upstream gradient: `dy`, with
// FLAG_RELU gated by the fused forward's output `y` (zero where `y <= 0`, a
// NaN `y` letting `dy` through: PyTorch's threshold_backward), written to
// `gated` as it is read: the residual's gradient `dz`, or `dx` as scratch
// that the dx pass reads back (upstream_in_place.wgsl). Put before the file, which
// defines the item types `Item` (Elem or Elem4), `ItemF` (f32 or vec4<f32>)
// and `ItemU` (u32 or vec4<u32>); upstream.wgsl is the plain counterpart.
@group(0) @binding(2) var<storage, read> dy: array<Item>;
@group(0) @binding(5) var<storage, read> y: array<Item>;
@group(0) @binding(6) var<storage, read_write> gated: array<Item>;

// The gated upstream gradient of item `i`, widened to f32, stored to
// `gated` unless the item lies past the slice's end (`live` false).
fn upstream(i: u32, live: bool) -> ItemF {
    var g = ItemF(dy[i]);
    if (p.flags & FLAG_RELU) != 0u {
        // y <= 0: +0, or the bits of -0 to -inf (relu in common.wgsl): told
        // apart by the bits, not by comparisons a driver may assume NaN-free
        let b = bitcast<ItemU>(ItemF(y[i]));
        let stop = (b == ItemU(0u)) | ((b >= ItemU(0x80000000u)) & (b <= ItemU(0xff800000u)));
        g = select(g, ItemF(0.0), stop);
    }
    if live {
        gated[i] = Item(g);
    }
    return g;
}

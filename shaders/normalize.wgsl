// Elementwise `y = (x - center[c]) * scale[c] + shift[c]`, one element per
// item, on the band grid of `band_walk` (rows of `C * inner` elements): used
// when a row is not a whole number of vec4s. The thread of an element that
// begins a storage word writes the word: with packed f16 (two elements per
// word) both of its elements, the second with the coefficients of the next
// position in the row, and the thread of the second element nothing; so no
// two threads write one word (`put`). Fused (FLAG_RESIDUAL, FLAG_RELU):
// `y = act(that + z)`; otherwise `z` is not read (an unfused call binds `x`
// there).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read> coef: array<vec4<f32>>;   // (center, scale, shift, 0)
@group(0) @binding(3) var<storage, read_write> y: array<Elem>;
@group(0) @binding(4) var<storage, read> z: array<Elem>;

// Stores word `w` of y; the word of an odd-length tensor's last element
// keeps the bits of its second half, past the tensor's end (only a packed
// word can be cut by the end: the first test folds away for the others).
fn put(w: u32, v: ElemF) {
    if PER_WORD == 1u || w < p.total / PER_WORD {
        y[w] = store(v);
    } else {
        y[w] = store_first(v, y[w]);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = band_walk(p, wid, nwg, lid, p.channels * p.inner);
    if !t.owns || t.first >= p.total {
        return;
    }
    let ch = word_channels(p, t.pos);
    let k0 = coef[ch.x];
    let k1 = coef[ch.y];
    let center = pair(k0.x, k1.x);
    let scale = pair(k0.y, k1.y);
    let shift = pair(k0.z, k1.z);
    var i = t.first;
    if (p.flags & (FLAG_RESIDUAL | FLAG_RELU)) != 0u {
        let residual = (p.flags & FLAG_RESIDUAL) != 0u;
        let act = (p.flags & FLAG_RELU) != 0u;
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            if i % PER_WORD == 0u {
                let w = i / PER_WORD;
                var v = (load(x[w]) - center) * scale + shift;
                if residual {
                    v += load(z[w]);
                }
                if act {
                    v = relu(v);
                }
                put(w, v);
            }
            i += p.band;
        }
        return;
    }
    for (var s = 0u; s < p.steps; s++) {
        if i >= p.total {
            break;
        }
        if i % PER_WORD == 0u {
            let w = i / PER_WORD;
            put(w, (load(x[w]) - center) * scale + shift);
        }
        i += p.band;
    }
}

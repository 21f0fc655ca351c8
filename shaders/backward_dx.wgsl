// Backward, stage 3: dx = a*dy + b*(x - center) + c, one element per item, on
// the band grid of `band_walk` (rows of `C * inner` elements): used when a row
// is not a whole number of vec4s. As in normalize.wgsl, the thread of an
// element that begins a storage word computes and writes the whole word (two
// elements with packed f16). `dy` is read through `upstream` a word at a
// time (items.wgsl; upstream.wgsl, or in a fused backward without a residual
// upstream_in_place.wgsl, which reads the gated dy that the reduction left
// in dx: the variant backward_dx_in_place).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>;   // (center, a, b, c)
@group(0) @binding(4) var<storage, read_write> dx: array<Elem>;

// Stores word `w` of dx, as `put` in normalize.wgsl.
fn put(w: u32, v: ElemF) {
    if PER_WORD == 1u || w < p.total / PER_WORD {
        dx[w] = store(v);
    } else {
        dx[w] = store_first(v, dx[w]);
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
    let a = pair(k0.y, k1.y);
    let b = pair(k0.z, k1.z);
    let c = pair(k0.w, k1.w);
    // b = 0 (running statistics) drops the x term, so a NaN in x stays out of
    // dx, as in PyTorch, whose evaluation backward never reads x; nor does
    // this one where every element of the thread's word has b = 0.
    let keep = b != ElemF(0.0);
    var i = t.first;
    if any(keep) {
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            if i % PER_WORD == 0u {
                let w = i / PER_WORD;
                let xt = select(ElemF(0.0), b * (load(x[w]) - center), keep);
                put(w, a * upstream(w, true) + xt + c);
            }
            i += p.band;
        }
    } else {
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            if i % PER_WORD == 0u {
                let w = i / PER_WORD;
                put(w, a * upstream(w, true) + c);
            }
            i += p.band;
        }
    }
}

// Elementwise `y = (x - center[c]) * scale[c] + shift[c]`, one element per
// item, on the band grid of `band_walk` (rows of `C * inner` elements): used
// when a row is not a whole number of vec4s. Fused (FLAG_RESIDUAL,
// FLAG_RELU): `y = act(that + z)`; otherwise `z` is not read (an unfused
// call binds `x` there).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read> coef: array<vec4<f32>>;   // (center, scale, shift, 0)
@group(0) @binding(3) var<storage, read_write> y: array<Elem>;
@group(0) @binding(4) var<storage, read> z: array<Elem>;

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
    let k = coef[t.pos / p.inner];
    var i = t.first;
    if (p.flags & (FLAG_RESIDUAL | FLAG_RELU)) != 0u {
        let residual = (p.flags & FLAG_RESIDUAL) != 0u;
        let act = (p.flags & FLAG_RELU) != 0u;
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            var v = (f32(x[i]) - k.x) * k.y + k.z;
            if residual {
                v += f32(z[i]);
            }
            if act {
                v = relu(v);
            }
            y[i] = Elem(v);
            i += p.band;
        }
        return;
    }
    for (var s = 0u; s < p.steps; s++) {
        if i >= p.total {
            break;
        }
        y[i] = Elem((f32(x[i]) - k.x) * k.y + k.z);
        i += p.band;
    }
}

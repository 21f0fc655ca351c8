// Elementwise `y = (x - center[c]) * scale[c] + shift[c]`, one vec4 per item,
// on the band grid of `band_walk` (rows of `C * inner / 4` vec4s): used when
// a row (`C * inner` elements) is a multiple of 4. The four lanes share a
// channel when `inner % 4 == 0` (channels-first), else each has its own
// (channels-last: four adjacent channels); either way a thread loads its
// coefficients once. Fused (FLAG_RESIDUAL, FLAG_RELU): `y = act(that + z)`;
// otherwise `z` is not read (an unfused call binds `x` there).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(2) var<storage, read> coef: array<vec4<f32>>;   // (center, scale, shift, 0)
@group(0) @binding(3) var<storage, read_write> y: array<Elem4>;
@group(0) @binding(4) var<storage, read> z: array<Elem4>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let items = p.total / 4u;
    let t = band_walk(p, wid, nwg, lid, p.channels * p.inner / 4u);
    if !t.owns || t.first >= items {
        return;
    }
    let e = t.pos * 4u;
    var center: vec4<f32>;
    var scale: vec4<f32>;
    var shift: vec4<f32>;
    if p.inner % 4u == 0u {
        let k = coef[e / p.inner];
        center = vec4<f32>(k.x);
        scale = vec4<f32>(k.y);
        shift = vec4<f32>(k.z);
    } else {
        let k0 = coef[e / p.inner];
        let k1 = coef[(e + 1u) / p.inner];
        let k2 = coef[(e + 2u) / p.inner];
        let k3 = coef[(e + 3u) / p.inner];
        center = vec4<f32>(k0.x, k1.x, k2.x, k3.x);
        scale = vec4<f32>(k0.y, k1.y, k2.y, k3.y);
        shift = vec4<f32>(k0.z, k1.z, k2.z, k3.z);
    }
    var j = t.first;
    if (p.flags & (FLAG_RESIDUAL | FLAG_RELU)) != 0u {
        let residual = (p.flags & FLAG_RESIDUAL) != 0u;
        let act = (p.flags & FLAG_RELU) != 0u;
        for (var s = 0u; s < p.steps; s++) {
            if j >= items {
                break;
            }
            var v = (load4(x[j]) - center) * scale + shift;
            if residual {
                v += load4(z[j]);
            }
            if act {
                v = relu4(v);
            }
            y[j] = store4(v);
            j += p.band;
        }
        return;
    }
    for (var s = 0u; s < p.steps; s++) {
        if j >= items {
            break;
        }
        y[j] = store4((load4(x[j]) - center) * scale + shift);
        j += p.band;
    }
}

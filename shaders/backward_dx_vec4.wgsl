// Backward, stage 3: dx = a*dy + b*(x - center) + c, one vec4 per item, on the
// band grid of `band_walk` (rows of `C * inner / 4` vec4s): used when a row
// (`C * inner` elements) is a multiple of 4. The four lanes share a channel
// when `inner % 4 == 0`, else each has its own; either way a thread loads its
// coefficients once. `dy` is read through `upstream`, as in backward_dx
// (items: items_vec4.wgsl).
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>;   // (center, a, b, c)
@group(0) @binding(4) var<storage, read_write> dx: array<Elem4>;

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
    var a: vec4<f32>;
    var b: vec4<f32>;
    var c: vec4<f32>;
    if p.inner % 4u == 0u {
        let k = coef[e / p.inner];
        center = vec4<f32>(k.x);
        a = vec4<f32>(k.y);
        b = vec4<f32>(k.z);
        c = vec4<f32>(k.w);
    } else {
        let k0 = coef[e / p.inner];
        let k1 = coef[(e + 1u) / p.inner];
        let k2 = coef[(e + 2u) / p.inner];
        let k3 = coef[(e + 3u) / p.inner];
        center = vec4<f32>(k0.x, k1.x, k2.x, k3.x);
        a = vec4<f32>(k0.y, k1.y, k2.y, k3.y);
        b = vec4<f32>(k0.z, k1.z, k2.z, k3.z);
        c = vec4<f32>(k0.w, k1.w, k2.w, k3.w);
    }
    // b = 0 (running statistics) drops the x term: a NaN in x stays out of dx,
    // and where every lane has b = 0 (an evaluation-mode backward) x is not read.
    let keep = b != vec4<f32>(0.0);
    var j = t.first;
    if any(keep) {
        for (var s = 0u; s < p.steps; s++) {
            if j >= items {
                break;
            }
            let xt = select(vec4<f32>(0.0), b * (load4(x[j]) - center), keep);
            dx[j] = store4(a * upstream(j, true) + xt + c);
            j += p.band;
        }
    } else {
        for (var s = 0u; s < p.steps; s++) {
            if j >= items {
                break;
            }
            dx[j] = store4(a * upstream(j, true) + c);
            j += p.band;
        }
    }
}

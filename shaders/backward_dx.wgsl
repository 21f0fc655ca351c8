// Backward, stage 3: dx = a*dy + b*(x - center) + c, one element per item, on
// the band grid of `band_walk` (rows of `C * inner` elements): used when a row
// is not a whole number of vec4s. `dy` is read through `upstream`
// (upstream.wgsl; in a fused backward without a residual upstream_in_place.wgsl,
// which reads the gated dy that the reduction left in dx: the variant
// backward_dx_in_place).
alias Item = Elem;
alias ItemF = f32;
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>;   // (center, a, b, c)
@group(0) @binding(4) var<storage, read_write> dx: array<Elem>;

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
    // b = 0 (running statistics) drops the x term, so a NaN in x stays out of dx,
    // as in PyTorch, whose evaluation backward never reads x; nor does this one.
    if k.z != 0.0 {
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            dx[i] = Elem(k.y * upstream(i, true) + k.z * (f32(x[i]) - k.x) + k.w);
            i += p.band;
        }
    } else {
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            dx[i] = Elem(k.y * upstream(i, true) + k.w);
            i += p.band;
        }
    }
}

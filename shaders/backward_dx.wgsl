// Backward, stage 3: dx = a*dy + b*(x - center) + c, one element per item, on
// the band grid of `band_walk` (rows of `C * inner` elements): used when a row
// is not a whole number of vec4s. With FLAG_DY_IN_DX (a fused backward
// without a residual) the upstream gradient is the gated dy that
// backward_partial_gated left in dx, read back in place; `dy` is not read.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem>;
@group(0) @binding(2) var<storage, read> dy: array<Elem>;
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
    let in_dx = (p.flags & FLAG_DY_IN_DX) != 0u;
    var i = t.first;
    // b = 0 (running statistics) drops the x term, so a NaN in x stays out of dx,
    // as in PyTorch, whose evaluation backward never reads x; nor does this one.
    if k.z != 0.0 {
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            dx[i] = Elem(k.y * upstream_at(i, in_dx) + k.z * (f32(x[i]) - k.x) + k.w);
            i += p.band;
        }
    } else {
        for (var s = 0u; s < p.steps; s++) {
            if i >= p.total {
                break;
            }
            dx[i] = Elem(k.y * upstream_at(i, in_dx) + k.w);
            i += p.band;
        }
    }
}

// The upstream gradient of element `i`: dy, or with FLAG_DY_IN_DX dx.
fn upstream_at(i: u32, in_dx: bool) -> f32 {
    if in_dx {
        return f32(dx[i]);
    }
    return f32(dy[i]);
}

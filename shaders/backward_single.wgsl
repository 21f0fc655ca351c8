// Single-pass backward (single.wgsl's groups, vec4 items of
// single_vec4.wgsl: ITEMS_RUN4, ITEMS_LANES or ITEMS_QUADS): what
// backward_partial, backward_finalize and backward_dx do in three
// dispatches, reading `x` and `dy` once, with the batch statistics
// (FLAG_BATCH_STATS) or the running ones (then dx = a g). Each thread
// holds its items of `x - K` and of the upstream gradient `g` in registers:
//   1. S1 = sum(g), S2 = sum(g * (x - K)), merged over the group,
//   2. dweight = (S2 - d S1) invstd and dbias = S1 into the layer's state,
//      the coefficients of dx on every thread (backward_finalize's order),
//   3. dx = a g + b (x - K) + c from the registers.
// Fused (FUSED): with FLAG_RELU, g is `dy` gated by the fused forward's
// output `y` (zero where `y <= 0`, a NaN `y` letting `dy` through:
// PyTorch's threshold_backward); with FLAG_RESIDUAL, g is also written to
// `dz`. Unfused calls bind stand-ins there, which the pipeline never touches.
@group(0) @binding(1) var<storage, read> x: array<Elem4>;
@group(0) @binding(4) var<storage, read_write> dx: array<Elem4>;
@group(0) @binding(5) var<storage, read> dy: array<Elem4>;
@group(0) @binding(6) var<storage, read> y: array<Elem4>;
@group(0) @binding(7) var<storage, read_write> dz: array<Elem4>;

// The upstream gradient of item `w`, gated by `y` with FLAG_RELU in FUSED.
fn gradient(w: u32) -> vec4<f32> {
    let g = load4(dy[w]);
    if (FUSED & FLAG_RELU) == 0u {
        return g;
    }
    // y <= 0: +0, or the bits of -0 to -inf (relu in common.wgsl): told apart
    // by the bits, not by comparisons a driver may assume NaN-free
    let b = bitcast<vec4<u32>>(load4(y[w]));
    let stop = (b == vec4(0u)) | ((b >= vec4(0x80000000u)) & (b <= vec4(0xff800000u)));
    return select(g, vec4(0.0), stop);
}

// The saved (K, d, invstd) of the group's lanes, each a vec4 over the lanes.
struct Stats {
    center: vec4<f32>,
    d: vec4<f32>,
    invstd: vec4<f32>,
}

fn stats_of(g: u32) -> Stats {
    if four_lanes() {
        let s0 = saved[g * 4u];
        let s1 = saved[g * 4u + 1u];
        let s2 = saved[g * 4u + 2u];
        let s3 = saved[g * 4u + 3u];
        return Stats(
            vec4(s0.x, s1.x, s2.x, s3.x),
            vec4(s0.y, s1.y, s2.y, s3.y),
            vec4(s0.z, s1.z, s2.z, s3.z),
        );
    }
    let s = saved[g];
    return Stats(vec4(s.x), vec4(s.y), vec4(s.z));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let at = place(wid, nwg, lid);
    let items = items_per_channel();
    var xv: array<vec4<f32>, K_MAX>;
    var gv: array<vec4<f32>, K_MAX>;
    var ix: array<u32, K_MAX>;
    var quad: array<u32, K_MAX>;
    var st = Stats(vec4(0.0), vec4(0.0), vec4(0.0));
    var s1 = acc_new();
    var s2 = acc_new();
    let batch = (p.flags & FLAG_BATCH_STATS) != 0u;
    // the sums are taken about `shift`: the forward's K with batch
    // statistics; from the running statistics a (finite) value of the
    // channel, not the running mean, which may lie far from the batch (S2 is
    // moved to the running mean after the merge)
    var shift = vec4(0.0);
    if at.live {
        st = stats_of(at.g);
        shift = st.center;
        if !batch {
            let v = shift_of(at.g);
            let finite = (bitcast<vec4<u32>>(v) & vec4(EXP_BITS)) != vec4(EXP_BITS);
            shift = select(st.center, v, finite);
        }
        for (var k = 0u; k < K; k++) {
            let i = at.l + k * T;
            if i < items {
                let it = item_of(at.g, i);
                ix[k] = it.x;
                quad[k] = it.y;
                let g = gradient(ix[k]);
                if (FUSED & FLAG_RESIDUAL) != 0u {
                    dz[ix[k]] = store4(g);
                }
                let e = load4(x[ix[k]]) - spread(shift, quad[k]);
                gv[k] = g;
                xv[k] = e;
                s1 = acc_add(s1, g, quad[k]);
                s2 = acc_add(s2, g * e, quad[k]);
            }
        }
    }
    // S1, and sum(g * (x - mean)) about K, per lane on every thread of the
    // group (the mean is K + d, or the running mean): one merge of the pair
    // for a channel, two merges of four lanes for four_lanes()
    var sum1: vec4<f32>;
    var about: vec4<f32>;
    if four_lanes() {
        sum1 = group_total(at, acc_total(s1), 0u, false, false).sum;
        about = group_total(at, acc_total(s2), 0u, false, false).sum;
    } else {
        let f1 = fold(acc_total(s1)).x;
        let f2 = fold(acc_total(s2)).x;
        let t = group_total(at, vec4(f1, f2, 0.0, 0.0), 0u, false, true).sum;
        sum1 = vec4(t.x);
        about = vec4(t.y);
    }
    if !at.live {
        return;
    }
    let sum2 = select(about - st.d * sum1, about + (shift - st.center) * sum1, !batch);
    var w = vec4(0.0);
    for (var k = 0u; k < lanes(); k++) {
        w[k] = bitcast<f32>(state[WEIGHT * p.state_stride + lane_channel(at.g, k)]);
    }
    // thread k of the group writes lane k's dweight and dbias
    if at.l < lanes() {
        let k = at.l;
        let c = lane_channel(at.g, k);
        state[DWEIGHT * p.state_stride + c] = bitcast<u32>(sum2[k] * st.invstd[k]);
        state[DBIAS * p.state_stride + c] = bitcast<u32>(sum1[k]);
    }
    if lanes() == 1u {
        w = vec4(w.x);
    }
    // backward_finalize's coefficients, in its order; from the running
    // statistics (no FLAG_BATCH_STATS) dx = a g alone
    let a = w * st.invstd;
    let b = select(vec4(0.0), -(a * st.invstd) * (sum2 * p.inv_m * st.invstd), batch);
    let c = select(vec4(0.0), -a * sum1 * p.inv_m - b * st.d, batch);
    // b = 0 drops the x term, as backward_dx: a NaN in x stays out of dx
    for (var k = 0u; k < K; k++) {
        if at.l + k * T < items {
            let r = quad[k];
            let bl = spread(b, r);
            let xt = select(vec4(0.0), bl * xv[k], bl != vec4(0.0));
            dx[ix[k]] = store4(spread(a, r) * gv[k] + xt + spread(c, r));
        }
    }
}

// The end of a training statistics computation, per channel, shared by
// stats_finalize and the single-pass forward (forward_single*), after
// common.wgsl and special.wgsl. The kernel declares `p`, `state` (the
// layer's state as u32 words) and `saved`.
//
// The batch mean is K + d (K a value of the channel, d the mean of x - K).
// The normalize step centres on K and folds d into its shift:
//   y = (x - K) * scale + (bias - d * scale),   scale = weight * invstd
// so that no f32 rounding of the mean reaches x - mean.

fn state_f32(i: u32) -> f32 {
    return bitcast<f32>(state[i]);
}

fn set_state_f32(i: u32, v: f32) {
    state[i] = bitcast<u32>(v);
}

// 1 / sqrt(var + eps) of a biased variance.
fn invstd_of(var_biased: f32) -> f32 {
    return 1.0 / sqrt(var_biased + p.eps);
}

// (center, scale, shift) of the normalize step of channel `c`, which held
// the non-finite values of `seen` (then y is NaN: its variance is).
fn coef_of(c: u32, shift: f32, d: f32, invstd: f32, seen: u32) -> vec3<f32> {
    if seen != 0u {
        let nan = bitcast<f32>(NAN_BITS);
        return vec3<f32>(non_finite_mean(seen), nan, nan);
    }
    let s = p.state_stride;
    let scale = state_f32(WEIGHT * s + c) * invstd;
    return vec3<f32>(shift, scale, state_f32(BIAS * s + c) - d * scale);
}

// Writes the saved statistics (K, d, invstd) of channel `c` and, with
// FLAG_UPDATE_RUNNING, moves its running statistics in place with the
// momentum factor the batch count stored for this step. A channel that held
// non-finite values saves PyTorch's mean for them and a NaN invstd.
fn save_channel(c: u32, shift: f32, d: f32, var_biased: f32, invstd: f32, seen: u32) {
    let s = p.state_stride;
    let im = RUNNING_MEAN * s + c;
    let iv = RUNNING_VAR * s + c;
    let k = state_f32(COUNTER * s + MOMENTUM_BITS);
    let update = (p.flags & FLAG_UPDATE_RUNNING) != 0u;
    if seen != 0u {
        // y, invstd and the running variance are NaN; the mean is PyTorch's
        let nan = bitcast<f32>(NAN_BITS);
        let special = non_finite_mean(seen);
        saved[c] = vec4<f32>(special, 0.0, nan, 0.0);
        if update {
            set_state_f32(im, running_non_finite(state_f32(im), special, k));
            set_state_f32(iv, nan);
        }
        return;
    }
    saved[c] = vec4<f32>(shift, d, invstd, 0.0);
    if update {
        set_state_f32(im, (1.0 - k) * state_f32(im) + k * (shift + d));
        set_state_f32(iv, (1.0 - k) * state_f32(iv) + k * (var_biased * p.unbias));
    }
}

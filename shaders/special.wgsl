// Shared by the passes that meet non-finite values (the statistics passes,
// the reductions, stats_finalize, forward_single), after common.wgsl.
//
// What a channel held besides finite values, told apart by the bits of each
// value (not by comparisons, which WGSL lets a driver assume never meet NaN
// or infinity): such values stay out of the sums, and the channel gets
// PyTorch's statistics for them.
const SEEN_POS_INF: u32 = 1u;
const SEEN_NEG_INF: u32 = 2u;
const SEEN_NAN: u32 = 4u;
const EXP_BITS: u32 = 0x7f800000u;
const NAN_BITS: u32 = 0x7fc00000u;
const POS_INF_BITS: u32 = 0x7f800000u;
const NEG_INF_BITS: u32 = 0xff800000u;

// The largest bits of the values of each lane, read as i32 (`hi`: only
// positive NaNs lie past +inf's bits) and as u32 (`top`: only negative NaNs
// lie past -inf's): what non-finite values a lane met, for two integer
// maxima a value where non_finite takes ten operations (extremes_seen).
struct Extremes {
    hi: vec4<i32>,
    top: vec4<u32>,
}

fn extremes_new() -> Extremes {
    return Extremes(vec4(bitcast<i32>(0x80000000u)), vec4(0u));
}

fn extremes_add(e: Extremes, v: vec4<f32>) -> Extremes {
    let bits = bitcast<vec4<u32>>(v);
    return Extremes(max(e.hi, bitcast<vec4<i32>>(bits)), max(e.top, bits));
}

// Per lane: the SEEN_* bits of the values `e` met. With a NaN the
// infinities are not told apart: the channel's statistics are NaN then.
fn extremes_seen(e: Extremes) -> vec4<u32> {
    let nan = (e.hi > vec4(bitcast<i32>(POS_INF_BITS))) | (e.top > vec4(NEG_INF_BITS));
    let pos = select(vec4(0u), vec4(SEEN_POS_INF), e.hi == vec4(bitcast<i32>(POS_INF_BITS)));
    let neg = select(vec4(0u), vec4(SEEN_NEG_INF), e.top == vec4(NEG_INF_BITS));
    return select(pos | neg, vec4(SEEN_NAN), nan);
}

// Per lane: 0 for a finite value, else its SEEN_* bit.
fn non_finite(bits: vec4<u32>) -> vec4<u32> {
    let special = (bits & vec4(EXP_BITS)) == vec4(EXP_BITS);
    let nan = (bits & vec4(0x007fffffu)) != vec4(0u);
    let sign = select(vec4(SEEN_POS_INF), vec4(SEEN_NEG_INF), (bits >> vec4(31u)) != vec4(0u));
    return select(vec4(0u), select(sign, vec4(SEEN_NAN), nan), special);
}

// The batch mean of a channel that held non-finite values (`seen` != 0),
// PyTorch's: +inf or -inf when it held only one kind of infinity besides
// finite values, else NaN. Its variance is NaN either way.
fn non_finite_mean(seen: u32) -> f32 {
    if seen == SEEN_POS_INF {
        return bitcast<f32>(POS_INF_BITS);
    }
    if seen == SEEN_NEG_INF {
        return bitcast<f32>(NEG_INF_BITS);
    }
    return bitcast<f32>(NAN_BITS);
}

// PyTorch's `(1 - k) * running + k * mean` for a mean of +-inf or NaN, chosen
// explicitly rather than left to arithmetic on infinities.
fn running_non_finite(running: f32, mean: f32, k: f32) -> f32 {
    let nan = bitcast<f32>(NAN_BITS);
    let mean_bits = bitcast<u32>(mean);
    if mean_bits == NAN_BITS || !(k > 0.0) {
        return nan;
    }
    let r_bits = bitcast<u32>(running);
    let r_finite = (r_bits & 0x7f800000u) != 0x7f800000u;
    return select(nan, mean, r_finite || r_bits == mean_bits);
}

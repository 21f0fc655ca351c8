// The vec4 items of the single passes (forward_single, backward_single),
// after single.wgsl: four elements of one run of one channel (ITEMS_RUN4),
// one element each of four adjacent channels (ITEMS_LANES), or four
// successive elements of the runs of four adjacent channels (ITEMS_QUADS),
// whose lanes may belong to different channels of the group: their
// channels, `r`, are kept per item as a packed word (`item_of`), values of
// the group's channels are spread onto an item's lanes (`spread`) and an
// item's lanes added into its channels' sums (`Acc`, `Seen`).

// Items of a channel (four_lanes(): of the group's four channels).
fn items_per_channel() -> u32 {
    if four_lanes() {
        return p.per_channel;
    }
    return p.per_channel / 4u;
}

// The index of item `i` of channel group `g`, and for ITEMS_QUADS the
// channels (0 to 3 in the group) of its lanes, two bits each (0 for the
// other items). Two divisions for ITEMS_QUADS: a lane's channel is the
// first lane's or the next (runs longer than 4).
fn item_of(g: u32, i: u32) -> vec2<u32> {
    if ITEMS == ITEMS_LANES {
        return vec2(i * (p.channels / 4u) + g, 0u);
    }
    if ITEMS == ITEMS_QUADS {
        // the runs of channels 4g..4g+3 of sample o: `inner` vec4s
        let o = i / p.inner;
        let j = i - o * p.inner;
        let e = 4u * j;
        let c = e / p.inner;
        let past = vec4(e) + vec4(0u, 1u, 2u, 3u) >= vec4((c + 1u) * p.inner);
        let r = vec4(c) + select(vec4(0u), vec4(1u), past);
        let quad = r.x | (r.y << 2u) | (r.z << 4u) | (r.w << 6u);
        return vec2((o * (p.channels / 4u) + g) * p.inner + j, quad);
    }
    let run4 = p.inner / 4u;
    let o = i / run4;
    return vec2((o * p.channels + g) * run4 + (i - o * run4), 0u);
}

fn unpack_quad(r: u32) -> vec4<u32> {
    return (vec4(r) >> vec4(0u, 2u, 4u, 6u)) & vec4(3u);
}

// The values `a` of the group's lanes on the lanes of an item of channels
// `r` (item_of); `a` itself for the other items.
fn spread(a: vec4<f32>, r: u32) -> vec4<f32> {
    if ITEMS != ITEMS_QUADS {
        return a;
    }
    let q = unpack_quad(r);
    return vec4(a[q.x], a[q.y], a[q.z], a[q.w]);
}

// Sums over items by channel: for ITEMS_QUADS one vec4 per channel of the
// group (a lane's value goes to the sum of its channel: selects, so that a
// non-finite lane stays in its channel), added up across lanes at the end
// (`acc_total`); for the other items `c0` alone, the sums of the item's lanes.
struct Acc {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
}

fn acc_new() -> Acc {
    return Acc(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
}

// `acc` plus the lanes `v` of an item of channels `r` (item_of).
fn acc_add(acc: Acc, v: vec4<f32>, r: u32) -> Acc {
    if ITEMS != ITEMS_QUADS {
        return Acc(acc.c0 + v, acc.c1, acc.c2, acc.c3);
    }
    let q = unpack_quad(r);
    let z = vec4(0.0);
    return Acc(
        acc.c0 + select(z, v, q == vec4(0u)),
        acc.c1 + select(z, v, q == vec4(1u)),
        acc.c2 + select(z, v, q == vec4(2u)),
        acc.c3 + select(z, v, q == vec4(3u)),
    );
}

// The sums of `acc`: per channel of the group for ITEMS_QUADS, else per lane.
fn acc_total(acc: Acc) -> vec4<f32> {
    if ITEMS != ITEMS_QUADS {
        return acc.c0;
    }
    let h = vec4(1.0);
    return vec4(dot(acc.c0, h), dot(acc.c1, h), dot(acc.c2, h), dot(acc.c3, h));
}

// The SEEN_* bits `s` of the lanes of an item of channels `r`, ORed per
// channel of the group; `s` itself for the other items.
fn collect_seen(s: vec4<u32>, r: u32) -> vec4<u32> {
    if ITEMS != ITEMS_QUADS {
        return s;
    }
    let q = unpack_quad(r);
    let z = vec4(0u);
    let c0 = select(z, s, q == vec4(0u));
    let c1 = select(z, s, q == vec4(1u));
    let c2 = select(z, s, q == vec4(2u));
    let c3 = select(z, s, q == vec4(3u));
    return vec4(
        c0.x | c0.y | c0.z | c0.w,
        c1.x | c1.y | c1.z | c1.w,
        c2.x | c2.y | c2.z | c2.w,
        c3.x | c3.y | c3.z | c3.w,
    );
}

// The non-finite values a thread met, by channel of the group: for
// ITEMS_QUADS, whose lanes change channel from item to item, their SEEN_*
// bits (collect_seen); for the other items each lane's largest bits
// (Extremes, special.wgsl), two integer maxima an element.
struct Seen {
    bits: vec4<u32>,
    ext: Extremes,
}

fn seen_new() -> Seen {
    return Seen(vec4(0u), extremes_new());
}

// `s` plus the values `v` of an item of channels `r` (item_of).
fn seen_add(s: Seen, v: vec4<f32>, r: u32) -> Seen {
    if ITEMS == ITEMS_QUADS {
        return Seen(s.bits | collect_seen(non_finite(bitcast<vec4<u32>>(v)), r), s.ext);
    }
    return Seen(s.bits, extremes_add(s.ext, v));
}

// The SEEN_* bits of `s`, per lane as collect_seen's.
fn seen_total(s: Seen) -> vec4<u32> {
    if ITEMS == ITEMS_QUADS {
        return s.bits;
    }
    return extremes_seen(s.ext);
}

// The shift K of each channel of the group: a value of the channel, the
// same on every thread. ITEMS_RUN4: the first element of the channel;
// ITEMS_LANES: the first element of each lane; ITEMS_QUADS: from the two
// items of the first sample where channel 0 meets 1 and 2 meets 3 (runs
// longer than 4: one meeting an item).
fn shift_of(g: u32) -> vec4<f32> {
    if ITEMS == ITEMS_QUADS {
        let base = g * p.inner;
        let b1 = p.inner % 4u;
        let b3 = (3u * p.inner) % 4u;
        let a = load4(x[base + p.inner / 4u]);
        let b = load4(x[base + 3u * p.inner / 4u]);
        return vec4(a[b1 - 1u], a[b1], b[b3 - 1u], b[b3]);
    }
    let first = load4(x[item_of(g, 0u).x]);
    if ITEMS == ITEMS_LANES {
        return first;
    }
    return vec4(first.x);
}

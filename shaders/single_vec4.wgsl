// The vec4 items of the single passes (forward_single, backward_single),
// after single.wgsl: four elements of one run of one channel (ITEMS_RUN4)
// or one element each of four adjacent channels (ITEMS_LANES).

// Items of a channel.
fn items_per_channel() -> u32 {
    if ITEMS == ITEMS_LANES {
        return p.per_channel;
    }
    return p.per_channel / 4u;
}

// The index of item `i` of channel group `g`.
fn item_at(g: u32, i: u32) -> u32 {
    if ITEMS == ITEMS_LANES {
        return i * (p.channels / 4u) + g;
    }
    let run4 = p.inner / 4u;
    let o = i / run4;
    return (o * p.channels + g) * run4 + (i - o * run4);
}

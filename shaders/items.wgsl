// The items of the backward passes that walk single elements
// (backward_partial, backward_dx), for the upstream parts (upstream.wgsl and
// its fused counterparts): an item of their arrays is a storage word of the
// prelude, `Elem` (one element; two with packed f16), widened to `ElemF`.
// items_vec4.wgsl is the vec4 counterpart.
alias Item = Elem;
alias ItemF = ElemF;
alias ItemU = ElemU;
// Elements per item.
const ITEM_ELEMS: u32 = PER_WORD;
// Whether the tensor's end can cut an item: a packed word of an odd-length
// tensor's last element.
const ITEM_CUT: bool = PER_WORD > 1u;

fn load_item(v: Item) -> ItemF {
    return load(v);
}

fn store_item(v: ItemF) -> Item {
    return store(v);
}

// The item of an odd-length tensor's last element: see `store_first`.
fn store_item_first(v: ItemF, old: Item) -> Item {
    return store_first(v, old);
}

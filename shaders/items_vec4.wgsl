// The items of the backward passes that walk vec4s (backward_partial_vec4,
// backward_dx_vec4), for the upstream parts, as items.wgsl: `Elem4`, widened
// to vec4<f32>.
alias Item = Elem4;
alias ItemF = vec4<f32>;
alias ItemU = vec4<u32>;
// Elements per item.
const ITEM_ELEMS: u32 = 4u;
// Whether the tensor's end can cut an item: never, the vec4 passes run on
// whole vec4s only.
const ITEM_CUT: bool = false;

fn load_item(v: Item) -> ItemF {
    return load4(v);
}

fn store_item(v: ItemF) -> Item {
    return store4(v);
}

// Never called (ITEM_CUT): a vec4 item lies inside its tensor.
fn store_item_first(v: ItemF, old: Item) -> Item {
    return store4(v);
}

// The separate elementwise passes of an unfused ResNet tail, which
// `bnorm bench --op fused` sets the fused BatchNorm against: the residual
// add and the ReLU in place on the BatchNorm's output (as torchvision's
// `out += identity; out = relu(out)`), and the ReLU's backward. One vec4 of
// the storage type per thread; the host dispatches whole vec4s only.
// Prepended by the tool: the library's storage prelude (Elem4, load4,
// store4: f32, f16 or f16 packed in u32 words), constants (WG) and
// common.wgsl (linear_workgroup).
@group(0) @binding(0) var<storage, read> a: array<Elem4>;        // add: z; relu_backward: y
@group(0) @binding(1) var<storage, read_write> b: array<Elem4>;  // add, relu: y in place; relu_backward: dy_bn (out)
@group(0) @binding(2) var<storage, read> c: array<Elem4>;        // relu_backward: dy

fn item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return linear_workgroup(wid, nwg) * WG + lid;
}

// b += a
@compute @workgroup_size(WG)
fn add_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = item(wid, nwg, lid);
    if j < arrayLength(&b) {
        b[j] = store4(load4(b[j]) + load4(a[j]));
    }
}

// b = relu(b), NaN kept
@compute @workgroup_size(WG)
fn relu_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = item(wid, nwg, lid);
    if j < arrayLength(&b) {
        let v = load4(b[j]);
        b[j] = store4(select(v, vec4<f32>(0.0), v < vec4<f32>(0.0)));
    }
}

// b = dy where y > 0 (or y is NaN), else 0: PyTorch's threshold_backward
@compute @workgroup_size(WG)
fn relu_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = item(wid, nwg, lid);
    if j < arrayLength(&b) {
        let dy = load4(c[j]);
        b[j] = store4(select(dy, vec4<f32>(0.0), load4(a[j]) <= vec4<f32>(0.0)));
    }
}

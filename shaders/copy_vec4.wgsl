// Bandwidth roofline for `bnorm bench`: dst = src, 16 bytes per thread.
// Copies bit patterns (vec4<u32>), so it serves every storage dtype. The
// host binds whole vec4s and copies a tail of 4, 8 or 12 bytes itself.
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = linear_workgroup(wid, nwg) * WG + lid;
    if j >= arrayLength(&dst) || j >= arrayLength(&src) {
        return;
    }
    dst[j] = src[j];
}

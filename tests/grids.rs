//! The GPU layer's grids, seen in what it records: reductions cut into
//! slices, dispatches folded onto a 2-D grid, tensors bound in chunks of
//! rows. Each is made to happen on small tensors (slice length, workgroup
//! and binding caps), shown to happen through `last_dispatches`, and checked
//! against the CPU reference.

mod common;
use common::*;
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, DType, GpuBatchNorm, GpuContext, GpuDispatch, GpuTensor,
    Layout, Mode,
};

/// `(name, shape, layout)` of the cases: vec4 runs of one channel, vec4s of
/// four channels (channels-last), single elements (runs of 35).
fn cases() -> Vec<(&'static str, Vec<usize>, Layout)> {
    vec![
        ("nchw_vec4", vec![12, 4, 8, 8], Layout::ChannelsFirst),
        ("nhwc_vec4", vec![6, 4, 4, 16], Layout::ChannelsLast),
        ("nchw_scalar", vec![140, 3, 35], Layout::ChannelsFirst),
    ]
}

/// A binding cap that cuts a tensor of `dims` stored with `size`-byte
/// elements into about three chunks, but no smaller than the fewest whole rows
/// a chunk can start after at any adapter's offset alignment.
fn cap_for(dims: &[usize], layout: Layout, size: u64) -> u64 {
    let len: u64 = dims.iter().map(|&d| d as u64).product();
    let outer = match layout {
        Layout::ChannelsFirst => dims[0] as u64,
        Layout::ChannelsLast => len / dims[dims.len() - 1] as u64,
    };
    let row = len / outer * size;
    let fewest = gpu_contexts()
        .iter()
        .map(|ctx| {
            let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment).max(4);
            let mut g = (row, align);
            while g.1 != 0 {
                g = (g.1, g.0 % g.1);
            }
            align / g.0 * row
        })
        .max()
        .unwrap_or(row);
    (len * size / 3).max(fewest)
}

/// The dispatches of `kernel` (any storage type, any merges) in `d`.
fn of<'a>(d: &'a [GpuDispatch], kernel: &str) -> Vec<&'a GpuDispatch> {
    d.iter()
        .filter(|d| kernel_name(d.kernel) == kernel)
        .collect()
}

/// The per-element bytes of `dims` split in chunks no larger than `cap`: the
/// dispatches of each pass that walks the tensor bind disjoint, aligned,
/// consecutive ranges that cover it.
fn assert_chunked(ctx: &GpuContext, d: &[GpuDispatch], kernel: &str, bytes: u64, cap: u64) {
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let passes = of(d, kernel);
    assert!(passes.len() >= 2, "{kernel}: {d:?}");
    let mut next = 0;
    for p in &passes {
        let (offset, size) = p.binding1;
        assert_eq!(
            offset, next,
            "{kernel}: chunks in order, back to back: {d:?}"
        );
        assert!(offset.is_multiple_of(align), "{kernel}: {d:?}");
        assert!(size <= cap, "{kernel}: {d:?}");
        next = offset + size;
    }
    assert_eq!(next, bytes.next_multiple_of(4), "{kernel}: {d:?}");
}

/// Workgroups of the statistics pass in a training forward of `x`.
fn stats_workgroups(bn: &mut GpuBatchNorm, x: &GpuTensor) -> u32 {
    bn.run_forward_train(x).unwrap();
    of(bn.last_dispatches(), "stats_partial")
        .iter()
        .chain(&of(bn.last_dispatches(), "stats_partial_vec4"))
        .map(|d| d.grid[0] * d.grid[1])
        .sum()
}

#[test]
fn slices_folds_and_chunks_happen_and_match_the_reference() {
    for (i, (name, dims, layout)) in cases().into_iter().enumerate() {
        let config = BatchNormConfig::new(
            dims[if layout == Layout::ChannelsLast {
                dims.len() - 1
            } else {
                1
            }],
        )
        .with_layout(layout);
        let mut r = rng(40 + i as u64);
        let state = random_state(&mut r, &config, 3);
        let x = normal(&mut r, &dims, 3.0, 2.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        let len: usize = dims.iter().product();
        let cap = cap_for(&dims, layout, 4);
        let checked = check_parity_with(name, &config, &state, &x, &dy, &|bn| {
            bn.set_slice_len(Some(16)).unwrap();
            bn.set_max_workgroups_per_dim(Some(1)).unwrap();
            bn.set_max_binding_bytes(Some(cap)).unwrap();
        });
        assert_eq!(checked, gpu_contexts().len());

        for ctx in gpu_contexts() {
            let gx = GpuTensor::from_array(ctx, x.view(), layout).unwrap();
            let gdy = GpuTensor::from_array(ctx, dy.view(), layout).unwrap();
            let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            // the statistics pass, not the single pass of small channels
            bn.set_single_pass(Some(false));
            let whole = stats_workgroups(&mut bn, &gx);
            bn.set_slice_len(Some(16)).unwrap();
            let sliced = stats_workgroups(&mut bn, &gx);
            assert!(sliced > whole, "{name}: slices {sliced} vs {whole}");

            bn.set_max_workgroups_per_dim(Some(1)).unwrap();
            bn.set_max_binding_bytes(Some(cap)).unwrap();
            let fwd = bn.run_forward_train(&gx).unwrap();
            let d = bn.last_dispatches().to_vec();
            assert!(
                d.iter().any(|d| d.grid[1] > 1),
                "{name}: a folded grid: {d:?}"
            );
            assert!(d.iter().all(|d| d.grid[0] == 1), "{name}: {d:?}");
            let bytes = len as u64 * 4;
            let stats = if d.iter().any(|d| d.kernel.starts_with("stats_partial_vec4")) {
                "stats_partial_vec4"
            } else {
                "stats_partial"
            };
            assert_chunked(ctx, &d, stats, bytes, cap);
            let normalize = if of(&d, "normalize_vec4").is_empty() {
                "normalize"
            } else {
                "normalize_vec4"
            };
            assert_chunked(ctx, &d, normalize, bytes, cap);
            bn.run_backward(&gx, &gdy, &fwd.saved).unwrap();
            let d = bn.last_dispatches();
            let dx = if of(d, "backward_dx_vec4").is_empty() {
                "backward_dx"
            } else {
                "backward_dx_vec4"
            };
            assert_chunked(ctx, d, dx, bytes, cap);
        }
    }
}

/// f16 storage bound in chunks gives the values of f16 storage bound whole,
/// with every f16 kernel set: WGSL's `f16` where the adapter has
/// SHADER_F16, the packed kernels everywhere (forced where it has it). The
/// chunks of packed f16 start at whole `u32` words, and an odd-length
/// tensor's last chunk ends inside one (`nchw_scalar_odd`).
#[test]
fn f16_chunks_match_f16_whole() {
    let mut cases = cases();
    cases.push(("nchw_scalar_odd", vec![141, 3, 35], Layout::ChannelsFirst));
    for (i, (name, dims, layout)) in cases.into_iter().enumerate() {
        let c = dims[if layout == Layout::ChannelsLast {
            dims.len() - 1
        } else {
            1
        }];
        let config = BatchNormConfig::new(c).with_layout(layout);
        let mut r = rng(60 + i as u64);
        let x = normal(&mut r, &dims, 1.0, 2.0);
        let dy = normal(&mut r, &dims, 0.0, 1.0);
        let bytes = dims.iter().product::<usize>() as u64 * 2;
        let cap = cap_for(&dims, layout, 2);
        let mut ran = 0;
        for ctx in gpu_contexts() {
            let shader_f16 = ctx.features().contains(wgpu::Features::SHADER_F16);
            for packed in [false, true] {
                if packed && !shader_f16 {
                    continue; // the adapter's own kernels are the packed ones
                }
                let on = format!("{name} on {} (packed {packed})", ctx.label());
                let run = |cap: Option<u64>| {
                    let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
                    bn.set_storage_dtype(DType::F16).unwrap();
                    bn.set_packed_f16(packed).unwrap();
                    bn.set_max_binding_bytes(cap).unwrap();
                    let y = flat(&bn.forward_train(x.view()).unwrap());
                    let g = bn.backward(x.view(), dy.view(), Mode::Train).unwrap();
                    let d = bn.last_dispatches().to_vec();
                    let packed_kernels = d.iter().any(|d| d.kernel.ends_with("_f16_packed"));
                    assert_eq!(packed_kernels, packed || !shader_f16, "{on}: {d:?}");
                    (y, flat(&g.dx), g.dweight.unwrap(), d)
                };
                let whole = run(None);
                let chunked = run(Some(cap));
                // the whole tensor's backward: its reduction, or the single pass
                let chunks = |d: &[GpuDispatch]| {
                    of(d, "backward_partial").len()
                        + of(d, "backward_partial_vec4").len()
                        + of(d, "backward_single").len()
                };
                assert_eq!(chunks(&whole.3), 1, "{on}");
                assert!(chunks(&chunked.3) >= 2, "{on}: {:?}", chunked.3);
                let dx = if of(&chunked.3, "backward_dx").is_empty() {
                    "backward_dx_vec4"
                } else {
                    "backward_dx"
                };
                assert_chunked(ctx, &chunked.3, dx, bytes, cap);
                all_close("y", &chunked.0, &whole.0, 2e-3, 2e-3)
                    .unwrap_or_else(|e| panic!("{on}: {e}"));
                all_close("dx", &chunked.1, &whole.1, 2e-3, 2e-3)
                    .unwrap_or_else(|e| panic!("{on}: {e}"));
                all_close("dweight", &chunked.2, &whole.2, 1e-3, 1e-3)
                    .unwrap_or_else(|e| panic!("{on}: {e}"));
                ran += 1;
            }
        }
        if gpu_required() {
            assert!(ran > 0, "no adapter ran f16");
        }
    }
}

/// A chunk must hold whole rows from an aligned offset: a row larger than
/// the binding cap is refused with the sizes named, and nothing is recorded.
#[test]
fn a_row_past_one_binding_is_a_clear_error() {
    for ctx in gpu_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(4)).unwrap();
        bn.set_max_binding_bytes(Some(1024)).unwrap();
        let x = GpuTensor::uninit(ctx, &[2, 4, 16, 16], Layout::ChannelsFirst).unwrap();
        let y = GpuTensor::uninit(ctx, &[2, 4, 16, 16], Layout::ChannelsFirst).unwrap();
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let e = bn.record_forward_train(&mut enc, &x, &y, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, wgpu_batchnorm::Error::TooLarge { .. }), "{e:?}");
        assert!(
            msg.contains("1024 elements") && msg.contains("max_storage_buffer_binding_size"),
            "{msg}"
        );
        assert_eq!(bn.num_batches_tracked().unwrap(), Some(0));
        assert!(bn.set_max_binding_bytes(Some(0)).is_err());
    }
}

//! The copy roofline kernel and GPU timing with timestamp queries, on every adapter.

mod common;
use common::*;
use wgpu_batchnorm::*;

#[test]
fn copy_copies_every_byte_of_odd_sizes() {
    let mut r = rng(21);
    for ctx in gpu_contexts() {
        // 4n, 4n+1..4n+3 elements: whole vec4s plus a tail the host copies.
        for dims in [[3usize, 5], [4, 4], [1, 2], [257, 3], [1031, 4]] {
            let x = flat(&normal(&mut r, &dims, 0.0, 1.0));
            let src = GpuTensor::from_slice(ctx, &x, &dims, Layout::ChannelsFirst).unwrap();
            let poison = vec![f32::NAN; x.len()];
            let dst = GpuTensor::from_slice(ctx, &poison, &dims, Layout::ChannelsFirst).unwrap();
            ctx.copy(&src, &dst).unwrap();
            assert_eq!(dst.to_vec().unwrap(), x, "{} {dims:?}", ctx.label());
        }
    }
}

#[test]
fn copy_refuses_other_shapes_and_devices() {
    let ctxs = gpu_contexts();
    for ctx in ctxs {
        let a = GpuTensor::uninit(ctx, &[4, 4], Layout::ChannelsFirst).unwrap();
        let b = GpuTensor::uninit(ctx, &[4, 5], Layout::ChannelsFirst).unwrap();
        let e = ctx.copy(&a, &b).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    }
    if let [c0, c1, ..] = ctxs {
        let a = GpuTensor::uninit(c0, &[4, 4], Layout::ChannelsFirst).unwrap();
        let b = GpuTensor::uninit(c1, &[4, 4], Layout::ChannelsFirst).unwrap();
        let e = c0.copy(&a, &b).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e}");
    }
}

#[test]
fn timestamps_time_operations_but_not_readbacks() {
    let mut r = rng(22);
    // Contexts of its own: the shared ones are used by tests running beside
    // this one, whose submits would be timed too.
    let own = if gpu_contexts().is_empty() {
        Vec::new()
    } else {
        GpuContext::all(&AdapterSelection::from_env()).unwrap()
    };
    for ctx in &own {
        let cfg = BatchNormConfig::new(8);
        let mut bn = GpuBatchNorm::new(ctx, cfg).unwrap();
        let dims = [4, 8, 16, 16];
        let x = GpuTensor::from_array(
            ctx,
            normal(&mut r, &dims, 1.0, 2.0).view(),
            Layout::ChannelsFirst,
        )
        .unwrap();
        if !ctx.has_timestamps() {
            let e = ctx.set_timestamps(true).unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{e}");
            assert!(!ctx.timestamps_enabled());
            eprintln!(
                "{}: no TIMESTAMP_QUERY, timing refused as expected",
                ctx.label()
            );
            continue;
        }
        assert_eq!(ctx.last_gpu_time(), None);
        ctx.set_timestamps(true).unwrap();
        assert!(ctx.timestamps_enabled());
        let y = bn.run_forward_train(&x).unwrap().y;
        let t = ctx
            .last_gpu_time()
            .expect("a timed submit records a GPU time");
        assert!(t.as_nanos() > 0, "{}: {t:?}", ctx.label());
        // A readback is not timed: the time stays that of the operation.
        let before = y.to_vec().unwrap();
        assert_eq!(ctx.last_gpu_time(), Some(t));
        // The bracketing passes do not change results.
        ctx.set_timestamps(false).unwrap();
        assert_eq!(ctx.last_gpu_time(), None);
        let mut bn2 = GpuBatchNorm::new(ctx, BatchNormConfig::new(8)).unwrap();
        assert_eq!(
            bn2.run_forward_train(&x).unwrap().y.to_vec().unwrap(),
            before
        );
        assert_eq!(ctx.last_gpu_time(), None, "untimed submits record nothing");
        // The copy kernel is timed too.
        ctx.set_timestamps(true).unwrap();
        let dst = GpuTensor::uninit(ctx, &dims, Layout::ChannelsFirst).unwrap();
        ctx.copy(&x, &dst).unwrap();
        assert!(ctx.last_gpu_time().is_some());
        ctx.set_timestamps(false).unwrap();
    }
}

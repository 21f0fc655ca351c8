//! f16 storage: parity with the reference (which emulates f16 storage) on
//! adapters with SHADER_F16, and a clear error on the others.

mod common;
use common::*;
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, CpuReference, DType, Error, GpuBatchNorm, GpuTensor, Layout,
};

/// f16 tolerance of shared/FIXTURES.md, for the big tensors.
const TOL_F16: f32 = 5e-3;

fn is_big(name: &str) -> bool {
    name.starts_with("y") || name.starts_with("dx")
}

fn f16_contexts() -> Vec<&'static wgpu_batchnorm::GpuContext> {
    gpu_contexts()
        .iter()
        .filter(|c| c.features().contains(wgpu::Features::SHADER_F16))
        .collect()
}

fn case(
    name: &str,
    dims: &[usize],
    config: BatchNormConfig,
    mean: f32,
    slice_len: Option<u32>,
    seed: u64,
) -> usize {
    let mut r = rng(seed);
    let state = random_state(&mut r, &config, 2);
    let x = normal(&mut r, dims, mean, 1.5);
    let dy = normal(&mut r, dims, 0.0, 1.0);
    let mut reference = CpuReference::new(config.clone()).unwrap();
    reference.set_state(&state).unwrap();
    reference.set_storage_dtype(DType::F16).unwrap();
    let want = run_all(&mut reference, &x, &dy);
    let mut checked = 0;
    for ctx in f16_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        bn.set_slice_len(slice_len).unwrap();
        bn.set_state(&state).unwrap();
        bn.set_storage_dtype(DType::F16).unwrap();
        let got = run_all(&mut bn, &x, &dy);
        assert_eq!(got.nbt, want.nbt);
        for ((k, g), (_, w)) in got.tensors.iter().zip(&want.tensors) {
            let tol = if is_big(k) { TOL_F16 } else { TOL };
            all_close(k, g, w, tol, tol).unwrap_or_else(|e| panic!("{name} on {}: {e}", got.name));
            if is_big(k) {
                // outputs really are f16 values
                assert!(
                    g.iter().all(|&v| v.is_nan() || DType::F16.round(v) == v),
                    "{name} {k}"
                );
            }
        }
        checked += 1;
    }
    checked
}

/// Name, shape, configuration, mean of the input, slice length.
type Case = (&'static str, Vec<usize>, BatchNormConfig, f32, Option<u32>);

#[test]
fn f16_parity_both_layouts_every_rank() {
    let expect_f16 = std::env::var("BNORM_EXPECT_F16").is_ok_and(|v| !v.is_empty());
    let last = |c| BatchNormConfig::new(c).with_layout(Layout::ChannelsLast);
    let cases: Vec<Case> = vec![
        ("rank2", vec![32, 8], BatchNormConfig::new(8), 0.5, None),
        (
            "rank3_odd",
            vec![3, 5, 7],
            BatchNormConfig::new(5),
            0.0,
            Some(9),
        ),
        (
            "rank4",
            vec![4, 6, 7, 9],
            BatchNormConfig::new(6),
            1.0,
            None,
        ),
        (
            "rank5",
            vec![2, 3, 4, 5, 6],
            BatchNormConfig::new(3),
            -1.0,
            Some(40),
        ),
        (
            "large_mean",
            vec![4, 3, 8, 8],
            BatchNormConfig::new(3),
            300.0,
            Some(50),
        ),
        ("nlc", vec![4, 10, 3], last(3), 0.0, None),
        ("nhwc", vec![4, 7, 9, 6], last(6), 0.5, Some(31)),
        ("ndhwc", vec![2, 4, 5, 6, 3], last(3), 0.0, None),
        (
            "affine_off",
            vec![4, 4, 5, 6],
            BatchNormConfig::new(4).with_affine(false),
            0.0,
            None,
        ),
        (
            "no_tracking",
            vec![4, 4, 5, 6],
            BatchNormConfig::new(4).with_track_running_stats(false),
            0.0,
            None,
        ),
        (
            "momentum_none",
            vec![4, 5, 6, 4],
            last(4).with_momentum(None),
            0.0,
            None,
        ),
    ];
    for (i, (name, dims, config, mean, slice)) in cases.into_iter().enumerate() {
        let n = case(name, &dims, config, mean, slice, 100 + i as u64);
        assert_eq!(n, f16_contexts().len());
        if expect_f16 {
            assert!(
                n > 0,
                "BNORM_EXPECT_F16 is set but no adapter has SHADER_F16"
            );
        }
    }
}

#[test]
fn f16_without_shader_f16_is_a_clear_error() {
    for ctx in gpu_contexts()
        .iter()
        .filter(|c| !c.features().contains(wgpu::Features::SHADER_F16))
    {
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        let e = bn.set_storage_dtype(DType::F16).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("SHADER_F16"), "{e}");
        assert_eq!(bn.storage_dtype(), DType::F32);
        let x = ndarray::ArrayD::<f32>::ones(vec![2, 3]);
        let e =
            GpuTensor::from_array_as(ctx, x.view(), Layout::ChannelsFirst, DType::F16).unwrap_err();
        assert!(e.to_string().contains("SHADER_F16"), "{e}");
        // f32 still works on the same layer
        bn.run_forward_train(&GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap())
            .unwrap();
    }
}

#[test]
fn mixed_dtypes_are_refused() {
    for ctx in f16_contexts() {
        let mut bn = GpuBatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        let mut r = rng(7);
        let x = normal(&mut r, &[2, 3, 4], 0.0, 1.0);
        let x16 =
            GpuTensor::from_array_as(ctx, x.view(), Layout::ChannelsFirst, DType::F16).unwrap();
        let x32 = GpuTensor::from_array(ctx, x.view(), Layout::ChannelsFirst).unwrap();
        let fwd = bn.run_forward_train(&x16).unwrap();
        let y = fwd.y;
        assert_eq!(y.dtype(), DType::F16);
        let e = bn.run_backward(&x16, &x32, &fwd.saved).unwrap_err();
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
        assert!(e.to_string().contains("dy is f32, expected f16"), "{e}");
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let e = bn
            .record_forward_train(&mut enc, &x32, &y, None)
            .unwrap_err();
        assert!(e.to_string().contains("y is f16, expected f32"), "{e}");
        assert_eq!(bn.num_batches_tracked().unwrap(), Some(1));
        let h = y.to_vec_f16().unwrap();
        assert_eq!(h.len(), 24);
        assert!(x32.to_vec_f16().is_err());
    }
}

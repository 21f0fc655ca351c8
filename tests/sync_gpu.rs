//! Synchronized BatchNorm with GPU participants: ranks on threads, one per
//! adapter wgpu finds (here lavapipe's Vulkan and llvmpipe's GL) plus the
//! CPU reference, meet through `InProcessCollective`; two training steps of
//! their parts together must equal the CPU reference on the whole batch.

mod common;
use common::*;
use ndarray::ArrayD;
use wgpu_batchnorm::sync::{self, InProcessCollective};
use wgpu_batchnorm::*;

/// What one rank computed in one step, read back to the host.
#[derive(Debug, Clone)]
struct Step {
    y: Vec<f32>,
    dx: Vec<f32>,
    dweight: Vec<f32>,
    dbias: Vec<f32>,
    state: BatchNormState,
}

/// One rank's two steps: on adapter `gpu` (an index into `gpu_contexts()`),
/// or on the CPU reference for `None`.
fn rank_steps(
    comm: &InProcessCollective,
    gpu: Option<usize>,
    config: &BatchNormConfig,
    state: &BatchNormState,
    steps: &[(ArrayD<f32>, ArrayD<f32>)],
) -> Vec<Step> {
    match gpu {
        Some(i) => {
            let ctx = &gpu_contexts()[i];
            let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
            bn.set_state(state).unwrap();
            let layout = config.layout;
            steps
                .iter()
                .map(|(x, dy)| {
                    let gx = GpuTensor::from_array(ctx, x.view(), layout).unwrap();
                    let gdy = GpuTensor::from_array(ctx, dy.view(), layout).unwrap();
                    let y = sync::forward_train(&mut bn, comm, gx.clone()).unwrap();
                    let g = sync::backward(&mut bn, comm, gx, gdy).unwrap();
                    Step {
                        y: y.to_vec().unwrap(),
                        dx: g.dx.to_vec().unwrap(),
                        dweight: g.dweight.unwrap().to_vec().unwrap(),
                        dbias: g.dbias.unwrap().to_vec().unwrap(),
                        state: bn.state().unwrap(),
                    }
                })
                .collect()
        }
        None => {
            let mut bn = CpuReference::new(config.clone()).unwrap();
            bn.set_state(state).unwrap();
            steps
                .iter()
                .map(|(x, dy)| {
                    let y = sync::forward_train(&mut bn, comm, x.view()).unwrap();
                    let g = sync::backward(&mut bn, comm, x.view(), dy.view()).unwrap();
                    Step {
                        y: flat(&y),
                        dx: flat(&g.dx),
                        dweight: g.dweight.unwrap(),
                        dbias: g.dbias.unwrap(),
                        state: bn.state().unwrap(),
                    }
                })
                .collect()
        }
    }
}

fn check(name: &str, config: BatchNormConfig, dims: &[usize], sizes: &[usize], seed: u64) {
    let mut r = rng(seed);
    let state = random_state(&mut r, &config, 3);
    let whole: Vec<(ArrayD<f32>, ArrayD<f32>)> = (0..2)
        .map(|k| {
            let x = normal(&mut r, dims, 3.0 + k as f32, 1.5);
            let dy = normal(&mut r, dims, 0.2, 1.0);
            (x, dy)
        })
        .collect();
    // the reference on the whole batch, one process
    let mut one = CpuReference::new(config.clone()).unwrap();
    one.set_state(&state).unwrap();
    let want: Vec<Step> = whole
        .iter()
        .map(|(x, dy)| {
            let y = one.forward_train(x.view()).unwrap();
            let g = one.backward(x.view(), dy.view(), Mode::Train).unwrap();
            Step {
                y: flat(&y),
                dx: flat(&g.dx),
                dweight: g.dweight.unwrap(),
                dbias: g.dbias.unwrap(),
                state: one.state().unwrap(),
            }
        })
        .collect();
    // ranks: every adapter, then the CPU reference
    let ranks: Vec<Option<usize>> = (0..gpu_contexts().len()).map(Some).chain([None]).collect();
    assert_eq!(ranks.len(), sizes.len(), "{name}: one part per rank");
    let parts: Vec<Vec<(ArrayD<f32>, ArrayD<f32>)>> = (0..ranks.len())
        .map(|rank| {
            whole
                .iter()
                .map(|(x, dy)| {
                    (
                        split(x, sizes)[rank].clone(),
                        split(dy, sizes)[rank].clone(),
                    )
                })
                .collect()
        })
        .collect();
    let group = InProcessCollective::group(ranks.len());
    let got: Vec<Vec<Step>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(&ranks)
            .zip(&parts)
            .map(|((comm, &gpu), steps)| {
                let (config, state) = (&config, &state);
                s.spawn(move || rank_steps(&comm, gpu, config, state, steps))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let layout = config.layout;
    for (step, want) in want.iter().enumerate() {
        // each rank's y and dx are its rows of the whole batch's
        let at = |v: &[f32], rank: usize| {
            let arr = ArrayD::from_shape_vec(dims.to_vec(), v.to_vec()).unwrap();
            flat(&split(&arr, sizes)[rank])
        };
        for (rank, steps) in got.iter().enumerate() {
            let g = &steps[step];
            let who = format!(
                "{name}, step {step}, rank {rank} ({:?}, {layout:?})",
                ranks[rank]
            );
            all_close(&format!("{who}: y"), &g.y, &at(&want.y, rank), TOL, TOL).unwrap();
            all_close(&format!("{who}: dx"), &g.dx, &at(&want.dx, rank), TOL, TOL).unwrap();
            all_close(
                &format!("{who}: dweight"),
                &g.dweight,
                &want.dweight,
                TOL,
                TOL,
            )
            .unwrap();
            all_close(&format!("{who}: dbias"), &g.dbias, &want.dbias, TOL, TOL).unwrap();
            let (s, w) = (&g.state, &want.state);
            all_close(
                &format!("{who}: running_mean"),
                s.running_mean.as_ref().unwrap(),
                w.running_mean.as_ref().unwrap(),
                TOL,
                TOL,
            )
            .unwrap();
            all_close(
                &format!("{who}: running_var"),
                s.running_var.as_ref().unwrap(),
                w.running_var.as_ref().unwrap(),
                TOL,
                TOL,
            )
            .unwrap();
            assert_eq!(s.num_batches_tracked, w.num_batches_tracked, "{who}");
        }
    }
}

/// Sizes of the parts for this machine's ranks (every adapter and the
/// reference): `sizes` cut or padded with empty parts.
fn sizes(base: &[usize]) -> Vec<usize> {
    let ranks = gpu_contexts().len() + 1;
    let mut s: Vec<usize> = base.iter().copied().take(ranks).collect();
    s.resize(ranks, 0);
    let rest: usize = base.iter().skip(ranks).sum();
    s[0] += rest;
    s
}

#[test]
fn gpu_ranks_match_the_whole_batch() {
    let sz = sizes(&[3, 2, 4]);
    let n: usize = sz.iter().sum();
    check("nchw", BatchNormConfig::new(5), &[n, 5, 6, 7], &sz, 1);
    let last = BatchNormConfig::new(8).with_layout(Layout::ChannelsLast);
    check("nhwc", last, &[n, 3, 4, 8], &sz, 2);
    let cumulative = BatchNormConfig::new(3).with_momentum(None);
    check("momentum_none", cumulative, &[n, 3, 10], &sz, 3);
}

#[test]
fn a_gpu_rank_with_no_samples() {
    let mut sz = sizes(&[0, 4, 5]);
    sz[0] = 0;
    let n: usize = sz.iter().sum();
    assert!(n >= 2);
    check(
        "empty_gpu_rank",
        BatchNormConfig::new(4),
        &[n, 4, 9],
        &sz,
        4,
    );
}

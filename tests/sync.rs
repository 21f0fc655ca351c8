//! Synchronized BatchNorm in one process: ranks on threads, each with its
//! own CPU reference or fast CPU backend and its part of the batch, meet
//! through `InProcessCollective`; their outputs together must equal the CPU
//! reference on the whole batch.

mod common;
use common::*;
use ndarray::{ArrayD, Axis, IxDyn};
use wgpu_batchnorm::sync::{self, Collective, InProcessCollective};
use wgpu_batchnorm::*;

/// A rank's layer: the CPU reference or the fast CPU backend.
enum Layer {
    Reference(CpuReference),
    Fast(CpuBatchNorm),
}

impl Layer {
    fn new(fast: bool, config: &BatchNormConfig, state: &BatchNormState) -> Layer {
        let mut l = if fast {
            Layer::Fast(CpuBatchNorm::new(config.clone()).unwrap())
        } else {
            Layer::Reference(CpuReference::new(config.clone()).unwrap())
        };
        l.backend().set_state(state).unwrap();
        l
    }

    fn backend(&mut self) -> &mut dyn BatchNormBackend {
        match self {
            Layer::Reference(b) => b,
            Layer::Fast(b) => b,
        }
    }

    fn forward(&mut self, comm: &InProcessCollective, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        match self {
            Layer::Reference(b) => sync::forward_train(b, comm, x.view()),
            Layer::Fast(b) => sync::forward_train(b, comm, x.view()),
        }
    }

    fn backward(
        &mut self,
        comm: &InProcessCollective,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
    ) -> Result<Gradients> {
        match self {
            Layer::Reference(b) => sync::backward(b, comm, x.view(), dy.view()),
            Layer::Fast(b) => sync::backward(b, comm, x.view(), dy.view()),
        }
    }
}

/// What one rank computed in one step.
#[derive(Debug, Clone)]
struct Step {
    y: ArrayD<f32>,
    grads: Gradients,
    saved: SavedStats,
    state: BatchNormState,
}

fn join(parts: &[ArrayD<f32>]) -> ArrayD<f32> {
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).unwrap()
}

/// Every rank's part of `x` and of `dy` in one step.
type RankParts = (Vec<ArrayD<f32>>, Vec<ArrayD<f32>>);

/// Runs `steps` synchronized training steps (forward, backward) on one
/// thread per rank; `fast[r]` picks rank r's backend. Returns each rank's steps.
fn run_ranks(
    config: &BatchNormConfig,
    state: &BatchNormState,
    fast: &[bool],
    steps: &[RankParts],
) -> Vec<Vec<Step>> {
    let group = InProcessCollective::group(fast.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(fast)
            .map(|(comm, &fast)| {
                s.spawn(move || {
                    let r = comm.rank();
                    let mut layer = Layer::new(fast, config, state);
                    steps
                        .iter()
                        .map(|(xs, dys)| {
                            let y = layer.forward(&comm, &xs[r]).unwrap();
                            let grads = layer.backward(&comm, &xs[r], &dys[r]).unwrap();
                            let b = layer.backend();
                            Step {
                                y,
                                grads,
                                saved: b.saved_stats().unwrap().unwrap(),
                                state: b.state().unwrap(),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Checks every rank of every step against the CPU reference on the whole batch.
fn check_against_whole(
    config: &BatchNormConfig,
    seed: u64,
    dims: &[usize],
    sizes: &[usize],
    fast: &[bool],
) {
    let mut rng = rng(seed);
    let state = random_state(&mut rng, config, 3);
    let steps: Vec<(ArrayD<f32>, ArrayD<f32>)> = (0..2)
        .map(|k| {
            let x = normal(&mut rng, dims, 4.0 + k as f32, 1.5);
            let dy = normal(&mut rng, dims, 0.2, 1.0);
            (x, dy)
        })
        .collect();
    let parts: Vec<_> = steps
        .iter()
        .map(|(x, dy)| (split(x, sizes), split(dy, sizes)))
        .collect();
    let ranks = run_ranks(config, &state, fast, &parts);

    let mut whole = CpuReference::new(config.clone()).unwrap();
    whole.set_state(&state).unwrap();
    for (k, (x, dy)) in steps.iter().enumerate() {
        let y = whole.forward_train(x.view()).unwrap();
        let g = whole.backward(x.view(), dy.view(), Mode::Train).unwrap();
        let want_state = whole.state().unwrap();
        let want_saved = whole.saved_stats().unwrap().unwrap();
        let what = |t: &str| format!("step {k}, {t} (sizes {sizes:?}, fast {fast:?})");
        let ys: Vec<_> = ranks.iter().map(|r| r[k].y.clone()).collect();
        let dxs: Vec<_> = ranks.iter().map(|r| r[k].grads.dx.clone()).collect();
        all_close(&what("y"), &flat(&join(&ys)), &flat(&y), TOL, TOL).unwrap();
        all_close(&what("dx"), &flat(&join(&dxs)), &flat(&g.dx), TOL, TOL).unwrap();
        for (r, rank) in ranks.iter().enumerate() {
            let got = &rank[k];
            assert_eq!(got.y.shape(), parts[k].0[r].shape(), "{}", what("y shape"));
            let close = |t: &str, a: &[f32], b: &[f32]| {
                all_close(&what(&format!("rank {r} {t}")), a, b, TOL, TOL).unwrap()
            };
            close("save_mean", &got.saved.mean, &want_saved.mean);
            close("save_invstd", &got.saved.invstd, &want_saved.invstd);
            if config.affine {
                let (dw, db) = (g.dweight.as_ref().unwrap(), g.dbias.as_ref().unwrap());
                close("dweight", got.grads.dweight.as_ref().unwrap(), dw);
                close("dbias", got.grads.dbias.as_ref().unwrap(), db);
            }
            if config.track_running_stats {
                let s = &got.state;
                close(
                    "running_mean",
                    s.running_mean.as_ref().unwrap(),
                    want_state.running_mean.as_ref().unwrap(),
                );
                close(
                    "running_var",
                    s.running_var.as_ref().unwrap(),
                    want_state.running_var.as_ref().unwrap(),
                );
            }
            assert_eq!(
                got.state.num_batches_tracked,
                want_state.num_batches_tracked
            );
            // Backends of one kind hold the same bits on every rank.
            let first = fast.iter().position(|&f| f == fast[r]).unwrap();
            assert_eq!(
                got.saved,
                ranks[first][k].saved,
                "{}",
                what("saved stats bits")
            );
            assert_eq!(got.state, ranks[first][k].state, "{}", what("state bits"));
            assert_eq!(
                got.grads.dweight,
                ranks[first][k].grads.dweight,
                "{}",
                what("dweight bits")
            );
        }
    }
}

#[test]
fn uneven_parts_and_an_empty_rank_equal_the_whole_batch() {
    let config = BatchNormConfig::new(3);
    let dims = [9, 3, 4, 5];
    check_against_whole(&config, 1, &dims, &[4, 0, 5], &[false, true, true]);
    check_against_whole(&config, 2, &dims, &[2, 3, 4], &[true, false, true]);
    check_against_whole(&config, 3, &dims, &[0, 9], &[true, true]);
    check_against_whole(
        &config,
        4,
        &dims,
        &[1, 1, 1, 6],
        &[false, false, true, true],
    );
}

#[test]
fn cumulative_momentum_channels_last_and_no_affine() {
    let config = BatchNormConfig::new(5)
        .with_momentum(None)
        .with_layout(Layout::ChannelsLast);
    check_against_whole(&config, 5, &[7, 3, 2, 5], &[3, 0, 4], &[true, false, true]);
    let config = BatchNormConfig::new(4).with_affine(false);
    check_against_whole(&config, 6, &[6, 4, 3], &[5, 1], &[true, true]);
    let config = BatchNormConfig::new(4).with_track_running_stats(false);
    check_against_whole(&config, 7, &[6, 4], &[2, 4], &[false, true]);
}

#[test]
fn one_value_per_rank_is_enough_when_the_whole_batch_has_more() {
    // (1, C) on each rank: a plain training forward refuses it, the
    // synchronized one sees 3 values per channel.
    let config = BatchNormConfig::new(6);
    check_against_whole(&config, 8, &[3, 6], &[1, 1, 1], &[true, false, true]);
}

#[test]
fn one_rank_is_the_plain_layer_bit_for_bit() {
    let config = BatchNormConfig::new(3);
    let mut rng = rng(9);
    let state = random_state(&mut rng, &config, 0);
    let x = normal(&mut rng, &[5, 3, 7], 300.0, 2.0);
    let dy = normal(&mut rng, &[5, 3, 7], 0.0, 1.0);
    for fast in [false, true] {
        let ranks = run_ranks(
            &config,
            &state,
            &[fast],
            &[(vec![x.clone()], vec![dy.clone()])],
        );
        let mut plain = Layer::new(fast, &config, &state);
        let b = plain.backend();
        let y = b.forward_train(x.view()).unwrap();
        let g = b.backward(x.view(), dy.view(), Mode::Train).unwrap();
        assert_eq!(ranks[0][0].y, y, "fast {fast}");
        assert_eq!(ranks[0][0].grads, g, "fast {fast}");
        assert_eq!(ranks[0][0].state, b.state().unwrap(), "fast {fast}");
    }
}

/// Runs `f` on one thread per rank with a group of `n` and returns the results.
fn on_ranks<T: Send>(n: usize, f: impl Fn(InProcessCollective) -> T + Sync) -> Vec<T> {
    let group = InProcessCollective::group(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = group.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_refused_part_fails_every_rank_and_changes_no_state() {
    let config = BatchNormConfig::new(3);
    let mut rng = rng(10);
    let state = random_state(&mut rng, &config, 2);
    let good = normal(&mut rng, &[4, 3, 2], 1.0, 1.0);
    let bad = normal(&mut rng, &[4, 2, 2], 1.0, 1.0); // 2 channels, not 3
    let results = on_ranks(3, |comm| {
        let r = comm.rank();
        let mut layer = Layer::new(r == 1, &config, &state);
        let x = if r == 2 { &bad } else { &good };
        let e = layer.forward(&comm, x).unwrap_err();
        let b = layer.backend();
        (e.to_string(), b.state().unwrap(), b.saved_stats().unwrap())
    });
    for (r, (e, s, saved)) in results.iter().enumerate() {
        if r == 2 {
            assert!(e.contains("channel count mismatch"), "rank {r}: {e}");
        } else {
            assert!(e.contains("rank 2 failed its local phase"), "rank {r}: {e}");
        }
        assert_eq!(s, &state, "rank {r}");
        assert!(saved.is_none(), "rank {r}");
    }
}

#[test]
fn a_whole_batch_of_one_value_per_channel_is_refused_on_every_rank() {
    let config = BatchNormConfig::new(2);
    let state = BatchNormState::new(&config);
    let x1 = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![1.0, 2.0]).unwrap();
    let x0 = ArrayD::from_shape_vec(IxDyn(&[0, 2]), vec![]).unwrap();
    let results = on_ranks(2, |comm| {
        let mut layer = Layer::new(comm.rank() == 0, &config, &state);
        let x = if comm.rank() == 0 { &x1 } else { &x0 };
        let e = layer.forward(&comm, x).unwrap_err();
        (e, layer.backend().state().unwrap())
    });
    for (e, s) in results {
        assert!(
            matches!(e, Error::SingleValueAcrossRanks { count: 1 }),
            "{e}"
        );
        assert_eq!(s, state);
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_without_changing_them() {
    let config = BatchNormConfig::new(2);
    let mut rng = rng(11);
    let state = random_state(&mut rng, &config, 0);
    let x = normal(&mut rng, &[3, 2, 4], 0.0, 1.0);
    let results = on_ranks(3, |comm| {
        if comm.rank() == 1 {
            drop(comm); // this rank fails before the step
            return None;
        }
        let mut layer = Layer::new(comm.rank() == 0, &config, &state);
        let e = layer.forward(&comm, &x).unwrap_err();
        Some((e.to_string(), layer.backend().state().unwrap()))
    });
    for (e, s) in results.into_iter().flatten() {
        assert!(e.contains("participant 1 left the group"), "{e}");
        assert_eq!(s, state);
    }
}

#[test]
fn plain_and_synchronized_backward_do_not_mix() {
    let config = BatchNormConfig::new(2);
    let mut rng = rng(12);
    let x = normal(&mut rng, &[3, 2, 4], 0.0, 1.0);
    let dy = normal(&mut rng, &[3, 2, 4], 0.0, 1.0);
    for fast in [false, true] {
        let comm = InProcessCollective::group(1).pop().unwrap();
        let mut layer = Layer::new(fast, &config, &BatchNormState::new(&config));
        layer.forward(&comm, &x).unwrap();
        let e = layer
            .backend()
            .backward(x.view(), dy.view(), Mode::Train)
            .unwrap_err();
        assert!(
            e.to_string().contains("its backward is sync::backward"),
            "{e}"
        );
        // Evaluation backward uses the running statistics and is allowed.
        layer
            .backend()
            .backward(x.view(), dy.view(), Mode::Eval)
            .unwrap();
        layer.backend().forward_train(x.view()).unwrap();
        let e = layer.backward(&comm, &x, &dy).unwrap_err();
        assert!(matches!(e, Error::NoSavedStatistics { .. }), "{e}");
        assert!(
            e.to_string().contains("last forward was not synchronized"),
            "{e}"
        );
    }
}

#[test]
fn ranks_with_different_channel_counts_in_the_collective_fail_cleanly() {
    // A transport-level mismatch (a rank configured with another
    // num_features) comes back as an Err on every rank.
    let results = on_ranks(2, |comm| {
        let local = vec![1.0; 3 + comm.rank()];
        let mut out = vec![0.0; 2 * local.len()];
        comm.all_gather_f64(&local, &mut out)
            .unwrap_err()
            .to_string()
    });
    for e in results {
        assert!(e.contains("different lengths [3, 4]"), "{e}");
    }
}

#[test]
fn a_refused_backward_part_fails_every_rank() {
    let config = BatchNormConfig::new(3);
    let mut rng = rng(13);
    let state = random_state(&mut rng, &config, 0);
    let x = normal(&mut rng, &[4, 3, 2], 1.0, 1.0);
    let dy = normal(&mut rng, &[4, 3, 2], 0.0, 1.0);
    let bad_dy = normal(&mut rng, &[4, 3, 3], 0.0, 1.0);
    let results = on_ranks(3, |comm| {
        let r = comm.rank();
        let mut layer = Layer::new(r == 0, &config, &state);
        layer.forward(&comm, &x).unwrap();
        let after_forward = layer.backend().state().unwrap();
        let e = layer.backward(&comm, &x, if r == 1 { &bad_dy } else { &dy });
        // The step can be repeated with good inputs: the rounds stay aligned.
        let again = layer.backward(&comm, &x, &dy).unwrap();
        (
            e.unwrap_err().to_string(),
            after_forward,
            layer.backend().state().unwrap(),
            again,
        )
    });
    for (r, (e, before, after, again)) in results.iter().enumerate() {
        if r == 1 {
            assert!(e.contains("dy has shape [4, 3, 3]"), "rank {r}: {e}");
        } else {
            assert!(
                e.contains("1 rank(s) failed their local backward phase"),
                "rank {r}: {e}"
            );
        }
        assert_eq!(before, after, "rank {r}");
        assert_eq!(again.dbias, results[0].3.dbias, "rank {r}");
    }
}

/// A transport that always fails, as a user's own `Collective` might.
struct Unreachable;

impl Collective for Unreachable {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn all_gather_f64(&self, _: &[f64], _: &mut [f64]) -> Result<()> {
        Err(Error::Collective {
            op: "all_gather_f64",
            rank: 0,
            message: "connection to rank 1 refused".into(),
        })
    }
}

#[test]
fn a_transport_error_is_an_err_and_changes_nothing() {
    let config = BatchNormConfig::new(2);
    let mut rng = rng(14);
    let state = random_state(&mut rng, &config, 5);
    let x = normal(&mut rng, &[3, 2, 4], 0.0, 1.0);
    let mut reference = CpuReference::new(config.clone()).unwrap();
    let mut fast = CpuBatchNorm::new(config.clone()).unwrap();
    reference.set_state(&state).unwrap();
    fast.set_state(&state).unwrap();
    let e = sync::forward_train(&mut reference, &Unreachable, x.view()).unwrap_err();
    assert!(
        e.to_string().contains("connection to rank 1 refused"),
        "{e}"
    );
    let e = sync::forward_train(&mut fast, &Unreachable, x.view()).unwrap_err();
    assert!(
        e.to_string().contains("connection to rank 1 refused"),
        "{e}"
    );
    assert_eq!(reference.state().unwrap(), state);
    assert_eq!(BatchNormBackend::state(&fast).unwrap(), state);
    assert!(reference.saved_stats().unwrap().is_none());
    assert!(fast.saved_stats().is_none());
}

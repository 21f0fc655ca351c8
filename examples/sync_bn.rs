//! Synchronized BatchNorm over MPI: each rank holds its part of a batch
//! (uneven parts; with 3 or more ranks, rank 1 holds none), runs two
//! synchronized training steps (forward and backward) on the fast CPU
//! backend, and rank 0 checks `y` and `dx` of every rank's part, the
//! running statistics and the gradients of every rank against the CPU
//! reference on the whole batch, within the fixture tolerance (1e-4).
//! A failure aborts the job with a non-zero exit status.
//!
//! ```sh
//! cargo build --release --features mpi --example sync_bn
//! mpirun --allow-run-as-root --oversubscribe -np 3 target/release/examples/sync_bn
//! ```
//!
//! With `SYNC_BN_BENCH=1` rank 0 also prints the time of a synchronized
//! step next to an unsynchronized one on the same part (64 channels).

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use ndarray::{ArrayD, Axis, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use std::time::Instant;
use wgpu_batchnorm::sync::{self, MpiCollective};
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, BatchNormState, CpuBatchNorm, CpuReference, Gradients, Mode,
};

/// f32 tolerance of shared/FIXTURES.md.
const TOL: f32 = 1e-4;
const CHANNELS: usize = 4;
const SAMPLE: [usize; 2] = [5, 6]; // (H, W)

/// Samples held by each of `size` ranks: uneven, and none on rank 1 when
/// there are at least 3 ranks.
fn part_sizes(size: usize) -> Vec<usize> {
    (0..size)
        .map(|r| {
            if size >= 3 && r == 1 {
                0
            } else {
                2 + (3 * r) % 5
            }
        })
        .collect()
}

fn dims(n: usize) -> Vec<usize> {
    vec![n, CHANNELS, SAMPLE[0], SAMPLE[1]]
}

/// The whole batch of step `step`, the same on every rank: `(x, dy)`.
fn whole_batch(n: usize, step: u64) -> (ArrayD<f32>, ArrayD<f32>) {
    let mut rng = StdRng::seed_from_u64(100 + step);
    let x = Normal::new(3.0f32 + step as f32, 2.0).unwrap();
    let dy = Normal::new(0.1f32, 1.0).unwrap();
    let x = ArrayD::from_shape_simple_fn(IxDyn(&dims(n)), || x.sample(&mut rng));
    let dy = ArrayD::from_shape_simple_fn(IxDyn(&dims(n)), || dy.sample(&mut rng));
    (x, dy)
}

/// A non-trivial initial state, the same on every rank.
fn initial_state(config: &BatchNormConfig) -> BatchNormState {
    let mut s = BatchNormState::new(config);
    let c = |f: fn(f32) -> f32| Some((0..CHANNELS).map(|i| f(i as f32)).collect());
    s.weight = c(|i| 0.5 + 0.3 * i);
    s.bias = c(|i| 0.25 - 0.1 * i);
    s.running_mean = c(|i| 0.1 * i);
    s.running_var = c(|i| 1.0 + 0.2 * i);
    s
}

/// Rank `r`'s part of `a`: its samples along axis 0.
fn part(a: &ArrayD<f32>, sizes: &[usize], r: usize) -> ArrayD<f32> {
    let at: usize = sizes[..r].iter().sum();
    a.slice_axis(Axis(0), (at..at + sizes[r]).into()).to_owned()
}

/// What a rank sends to rank 0 after a step, in this order.
fn report(y: &ArrayD<f32>, g: &Gradients, s: &BatchNormState) -> Vec<Vec<f32>> {
    vec![
        y.iter().copied().collect(),
        g.dx.iter().copied().collect(),
        g.dweight.clone().unwrap(),
        g.dbias.clone().unwrap(),
        s.running_mean.clone().unwrap(),
        s.running_var.clone().unwrap(),
        vec![s.num_batches_tracked.unwrap() as f32],
    ]
}

/// The count of elements outside `|got - want| <= TOL + TOL |want|` (NaN
/// matching only NaN) and the worst excess.
fn compare(got: &[f32], want: &[f32]) -> (usize, f32) {
    assert_eq!(got.len(), want.len(), "lengths");
    got.iter()
        .zip(want)
        .fold((0, 0.0f32), |(bad, worst), (&g, &w)| {
            if g.is_nan() || w.is_nan() {
                let ok = g.is_nan() && w.is_nan();
                return (
                    bad + usize::from(!ok),
                    if ok { worst } else { f32::INFINITY },
                );
            }
            let excess = (g - w).abs() - TOL * w.abs();
            (bad + usize::from(excess > TOL), worst.max(excess))
        })
}

fn fail(world: &SimpleCommunicator, msg: &str) -> ! {
    eprintln!("rank {}: {msg}", world.rank());
    world.abort(1)
}

fn main() {
    let universe = mpi::initialize().expect("MPI is initialized once");
    let comm = MpiCollective::new(universe.world());
    let world = comm.communicator();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let sizes = part_sizes(size);
    let n: usize = sizes.iter().sum();
    let config = BatchNormConfig::new(CHANNELS);
    let state = initial_state(&config);

    let mut bn = CpuBatchNorm::new(config.clone()).unwrap();
    bn.set_state(&state).unwrap();
    let mut reference = (rank == 0).then(|| {
        let mut r = CpuReference::new(config.clone()).unwrap();
        r.set_state(&state).unwrap();
        r
    });
    if rank == 0 {
        println!(
            "{size} ranks, parts of {sizes:?} samples of {:?}",
            &dims(1)[1..]
        );
    }

    for step in 0..2 {
        let (x, dy) = whole_batch(n, step);
        let (xp, dyp) = (part(&x, &sizes, rank), part(&dy, &sizes, rank));
        let y = sync::forward_train(&mut bn, &comm, xp.view())
            .unwrap_or_else(|e| fail(world, &format!("forward: {e}")));
        let g = sync::backward(&mut bn, &comm, xp.view(), dyp.view())
            .unwrap_or_else(|e| fail(world, &format!("backward: {e}")));
        let mine = report(&y, &g, bn.state());
        if rank != 0 {
            for v in &mine {
                world.process_at_rank(0).send(&v[..]);
            }
            continue;
        }
        // Rank 0: the reference on the whole batch, then every rank's report.
        let r = reference.as_mut().unwrap();
        let want_y = r.forward_train(x.view()).unwrap();
        let want_g = r.backward(x.view(), dy.view(), Mode::Train).unwrap();
        let want_s = r.state().unwrap();
        let mut failed = false;
        for from in 0..size {
            let got: Vec<Vec<f32>> = if from == 0 {
                mine.clone()
            } else {
                (0..mine.len())
                    .map(|_| world.process_at_rank(from as i32).receive_vec::<f32>().0)
                    .collect()
            };
            let want = report(
                &part(&want_y, &sizes, from),
                &Gradients {
                    dx: part(&want_g.dx, &sizes, from),
                    ..want_g.clone()
                },
                &want_s,
            );
            let names = [
                "y",
                "dx",
                "dweight",
                "dbias",
                "running_mean",
                "running_var",
                "num_batches_tracked",
            ];
            for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                let (bad, worst) = compare(g, w);
                if bad > 0 {
                    failed = true;
                    eprintln!(
                        "step {step}, rank {from}: {name}: {bad} of {} out of tolerance (worst excess {worst:e})",
                        g.len()
                    );
                }
            }
            // The exchange gives every rank the same bits.
            if got[2..] != mine[2..] {
                failed = true;
                eprintln!(
                    "step {step}: rank {from}'s gradients or running statistics differ from rank 0's bits"
                );
            }
        }
        if failed {
            fail(
                world,
                "synchronized BatchNorm differs from the CPU reference on the whole batch",
            );
        }
        println!(
            "step {step}: y, dx, dweight, dbias and running statistics of all {size} ranks match the CPU reference on the whole batch of {n}"
        );
    }

    if std::env::var("SYNC_BN_BENCH").is_ok_and(|v| v == "1") {
        bench(&comm, rank);
    }
}

/// Median time of a synchronized training step (forward and backward) and
/// of an unsynchronized one on the same part of 16 samples of 64 x 28 x 28.
fn bench(comm: &MpiCollective<SimpleCommunicator>, rank: usize) {
    let dims = [16, 64, 28, 28];
    let (x, dy) = {
        let mut rng = StdRng::seed_from_u64(7 + rank as u64);
        let d = Normal::new(1.0f32, 2.0).unwrap();
        let mut f = || ArrayD::from_shape_simple_fn(IxDyn(&dims), || d.sample(&mut rng));
        (f(), f())
    };
    let mut bn = CpuBatchNorm::new(BatchNormConfig::new(64)).unwrap();
    let median = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2] * 1e3
    };
    let world = comm.communicator();
    let mut timed = |synced: bool| {
        let t: Vec<f64> = (0..30)
            .map(|_| {
                world.barrier();
                let t0 = Instant::now();
                if synced {
                    sync::forward_train(&mut bn, comm, x.view()).unwrap();
                    sync::backward(&mut bn, comm, x.view(), dy.view()).unwrap();
                } else {
                    bn.forward_train(x.view()).unwrap();
                    bn.backward(x.view(), dy.view(), Mode::Train).unwrap();
                }
                t0.elapsed().as_secs_f64()
            })
            .collect();
        median(t)
    };
    let plain = timed(false);
    let synced = timed(true);
    let exchange = {
        let local = vec![
            wgpu_batchnorm::Moments {
                n: 1.0,
                mean: 0.0,
                m2: 0.0
            };
            64
        ];
        let sums = vec![(0.0, 0.0); 64];
        let t: Vec<f64> = (0..200)
            .map(|_| {
                world.barrier();
                let t0 = Instant::now();
                sync::merge_moments(comm, Some(&local), 64).unwrap();
                sync::sum_grad_sums(comm, Some(&sums), 64).unwrap();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        median(t)
    };
    if rank == 0 {
        println!(
            "per rank {dims:?}: unsynchronized step {plain:.3} ms, synchronized step {synced:.3} ms, the two exchanges alone {exchange:.4} ms (medians)"
        );
    }
}

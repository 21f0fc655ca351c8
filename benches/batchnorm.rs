//! Criterion benches: `cpu_{train,eval,backward}` (the fast CPU backend) and
//! `gpu_{train,eval,backward}` (every adapter wgpu finds), with
//! `Throughput::Bytes` of the ideal traffic (`Operation::ideal_bytes_per_element`,
//! f32: 12, 8 and 20 bytes per
//! element), so criterion reports GB/s.
//!
//! GPU timings use `iter_custom` around the `_into` methods, each of which
//! submits one command buffer and waits for the device: the poll is inside
//! the timed region and nothing is allocated there.
//!
//! ```text
//! cargo bench                                   # modest default shapes
//! BNORM_BENCH_SHAPES=32x256x56x56,4096x1024 cargo bench -- gpu_train
//! ```
//!
//! `bnorm bench` is the tool for tables, JSON and copy rooflines; these
//! benches are for tracking one kernel's speed across changes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::{Duration, Instant};
use wgpu_batchnorm::{
    AdapterSelection, BatchNormConfig, CpuBatchNorm, DType, GpuBatchNorm, GpuContext,
    GpuSavedStats, GpuTensor, Layout, Mode, Operation,
};

/// Default shapes: small enough that `cargo bench` takes minutes on a
/// 2-core machine with a software adapter.
const SHAPES: &[&str] = &["8x64x32x32", "1024x256"];

/// A logical `N x C x spatial` shape (channels-first), from `NxCx...`.
struct Shape {
    name: String,
    dims: Vec<usize>,
}

impl Shape {
    fn parse(s: &str) -> Result<Shape, String> {
        let dims = s
            .split(['x', 'X'])
            .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
            .collect::<Option<Vec<usize>>>()
            .filter(|d| (2..=5).contains(&d.len()))
            .ok_or_else(|| format!("{s:?} is not a shape NxCx... of 2 to 5 positive dimensions"))?;
        Ok(Shape {
            name: s.trim().to_string(),
            dims,
        })
    }

    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn channels(&self) -> usize {
        self.dims[1]
    }
}

fn shapes() -> Vec<Shape> {
    match std::env::var("BNORM_BENCH_SHAPES") {
        Ok(list) if !list.trim().is_empty() => list
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(|s| Shape::parse(s).unwrap_or_else(|e| panic!("BNORM_BENCH_SHAPES: {e}")))
            .collect(),
        _ => SHAPES
            .iter()
            .map(|s| Shape::parse(s).expect("valid default shape"))
            .collect(),
    }
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 * 4.0 - 2.0
        })
        .collect()
}

fn group_name(prefix: &str, op: Operation) -> String {
    let op = match op {
        Operation::TrainForward => "train",
        Operation::EvalForward => "eval",
        Operation::Backward => "backward",
    };
    format!("{prefix}_{op}")
}

fn bytes(shape: &Shape, op: Operation) -> u64 {
    (shape.len() as f64 * op.ideal_bytes_per_element(DType::F32)) as u64
}

fn cpu(c: &mut Criterion) {
    for op in Operation::ALL {
        let mut group = c.benchmark_group(group_name("cpu", op));
        for shape in shapes() {
            let dims = shape.dims.as_slice();
            let n = shape.len();
            let ch = shape.channels();
            let x = data(n, 1);
            let dy = data(n, 2);
            let (mut y, mut dx) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (mut dw, mut db) = (vec![0.0f32; ch], vec![0.0f32; ch]);
            let mut bn = CpuBatchNorm::new(BatchNormConfig::new(ch)).expect("config");
            bn.forward_train_slice(&x, dims, &mut y).expect("forward");
            group.throughput(Throughput::Bytes(bytes(&shape, op)));
            group.bench_function(BenchmarkId::from_parameter(&shape.name), |b| match op {
                Operation::TrainForward => {
                    b.iter(|| bn.forward_train_slice(&x, dims, &mut y).unwrap())
                }
                Operation::EvalForward => {
                    b.iter(|| bn.forward_eval_slice(&x, dims, &mut y).unwrap())
                }
                Operation::Backward => b.iter(|| {
                    bn.backward_slice(&x, &dy, dims, Mode::Train, &mut dx, &mut dw, &mut db)
                        .unwrap()
                }),
            });
        }
        group.finish();
    }
}

fn gpu(c: &mut Criterion) {
    let contexts = match GpuContext::all(&AdapterSelection::from_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("\n*** SKIPPED gpu_* benches: {e} ***\n");
            return;
        }
    };
    let layout = Layout::ChannelsFirst;
    for op in Operation::ALL {
        let mut group = c.benchmark_group(group_name("gpu", op));
        for ctx in &contexts {
            for shape in shapes() {
                let dims = shape.dims.as_slice();
                let n = shape.len();
                let ch = [shape.channels()];
                let tensors = (|| {
                    Ok::<_, wgpu_batchnorm::Error>((
                        GpuTensor::from_slice(ctx, &data(n, 1), dims, layout)?,
                        GpuTensor::from_slice(ctx, &data(n, 2), dims, layout)?,
                        GpuTensor::uninit(ctx, dims, layout)?,
                        GpuTensor::uninit(ctx, dims, layout)?,
                        GpuBatchNorm::new(ctx, BatchNormConfig::new(ch[0]))?,
                    ))
                })();
                let (x, dy, y, dx, mut bn) = match tensors {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("*** SKIPPED {} {}: {e} ***", ctx.label(), shape.name);
                        continue;
                    }
                };
                let mut saved = GpuSavedStats::new(&bn).expect("saved statistics");
                ctx.run("forward", |enc| {
                    bn.record_forward_train(enc, &x, &y, Some(&mut saved))
                })
                .expect("forward");
                group.throughput(Throughput::Bytes(bytes(&shape, op)));
                let id = BenchmarkId::new(ctx.adapter_info().backend.to_string(), &shape.name);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            // Each call submits once and waits for the device.
                            ctx.run("bench", |enc| match op {
                                Operation::TrainForward => {
                                    bn.record_forward_train(enc, &x, &y, Some(&mut saved))
                                }
                                Operation::EvalForward => bn.record_forward_eval(enc, &x, &y, None),
                                Operation::Backward => {
                                    bn.record_backward(enc, &x, &dy, &saved, &dx)
                                }
                            })
                            .unwrap();
                        }
                        start.elapsed()
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = cpu, gpu
}
criterion_main!(benches);

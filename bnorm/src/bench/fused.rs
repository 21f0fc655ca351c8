//! `bnorm bench --op fused`: the fused BatchNorm + residual add + ReLU
//! against the plain BatchNorm followed by separate add and ReLU passes
//! ([`unfused`](super::unfused)), on the same device in the same run.
//!
//! Both variants of an operation are counted against the fused op's traffic
//! floor ([`FusedOp::ideal_bytes_per_element`]), so their fractions of copy
//! compare the same work; `fused_speedup` is the unfused time over the fused
//! time.

use super::measure::{
    Case, Run, Skip, cpu_copy_gbps, data, gpu_copy_gbps, gpu_layer, time_sources, time_wall,
};
use super::unfused::{GpuUnfused, cpu_gate, cpu_tail};
use half::f16;
use indicatif::ProgressBar;
use wgpu_batchnorm::cpu::CpuElement;
use wgpu_batchnorm::{
    Activation, BatchNormConfig, CpuBatchNorm, DType, FusedOp, Fusion, GpuBatchNorm, GpuContext,
    GpuSavedStats, GpuTensor, Mode, Operation, Result,
};

/// The record name of the unfused variant of `op`.
pub fn unfused_name(op: Operation) -> &'static str {
    match op {
        Operation::TrainForward => "unfused_train_forward",
        Operation::EvalForward => "unfused_eval_forward",
        Operation::Backward => "unfused_backward",
    }
}

/// Records of `op` fused and unfused, with their times (`None`: not measured).
#[allow(clippy::too_many_arguments)]
fn push_pair(
    run: &mut Run,
    case: &Case<'_>,
    (op, fusion): (Operation, Fusion),
    (backend, device, source): (&str, &str, Option<&'static str>),
    copy_gbps: f64,
    fused: Result<f64>,
    unfused: Result<f64>,
    what: &str,
) {
    let fop = FusedOp::new(op, fusion);
    let bytes = fop.ideal_bytes_per_element(case.dtype);
    for (name, t) in [(fop.name(), fused), (unfused_name(op), unfused)] {
        match t {
            Ok(t) => {
                let mut r = case.record_named(name, bytes, backend, device, t, copy_gbps);
                r.gpu_time_source = source;
                r.fusion = Some(fusion.name());
                run.records.push(r);
            }
            Err(error) => run.skips.push(Skip {
                what: format!(
                    "{what} {name}{}",
                    source.map_or(String::new(), |s| format!(" ({s} time)"))
                ),
                error,
            }),
        }
    }
}

/// Measures the fast CPU backend on one shape, fused against unfused.
pub fn bench_cpu(case: &Case<'_>, fusion: Fusion, run: &mut Run, pb: &ProgressBar) {
    match case.dtype {
        DType::F32 => bench_cpu_as::<f32>(case, fusion, run, pb),
        DType::F16 => bench_cpu_as::<f16>(case, fusion, run, pb),
    }
}

fn bench_cpu_as<E: CpuElement>(case: &Case<'_>, fusion: Fusion, run: &mut Run, pb: &ProgressBar) {
    let device = super::measure::cpu_name();
    let what = format!("cpu {} {}", case.shape.name(), case.layout);
    let dims = case.shape.dims(case.layout);
    let n = case.shape.len();
    let stored = |v: Vec<f32>| -> Vec<E> { v.into_iter().map(E::store).collect() };
    let (x, z, dy) = (stored(data(n, 1)), stored(data(n, 3)), stored(data(n, 2)));
    let zero = || vec![E::store(0.0); n];
    let (mut y, mut t, mut dx, mut g) = (zero(), zero(), zero(), zero());
    let c = case.shape.channels();
    let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    let copy = cpu_copy_gbps(case, &x, &mut y);
    pb.inc(1);
    let copy_gbps = match copy {
        Ok(g) => g,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(3);
            return;
        }
    };
    let mut bn = match CpuBatchNorm::new(BatchNormConfig::new(c).with_layout(case.layout)) {
        Ok(bn) => bn,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(3);
            return;
        }
    };
    let zr = fusion.residual.then_some(z.as_slice());
    let act = fusion.activation;
    for op in Operation::ALL {
        pb.set_message(format!("cpu fused {} {}", op.name(), case.shape.name()));
        let mode = if op == Operation::EvalForward {
            Mode::Eval
        } else {
            Mode::Train
        };
        let (fused, unfused) = match op {
            Operation::TrainForward | Operation::EvalForward => (
                time_wall(case.warmup, case.repeat, || {
                    bn.forward_fused_slice(&x, zr, &dims, act, mode, &mut y)
                }),
                time_wall(case.warmup, case.repeat, || {
                    match mode {
                        Mode::Train => bn.forward_train_slice(&x, &dims, &mut t)?,
                        Mode::Eval => bn.forward_eval_slice(&x, &dims, &mut t)?,
                    }
                    cpu_tail(&t, zr, act, &mut y);
                    Ok(())
                }),
            ),
            Operation::Backward => {
                let mut dz = fusion.residual.then_some(&mut g);
                let fused = bn
                    .forward_fused_slice(&x, zr, &dims, act, Mode::Train, &mut y)
                    .and_then(|()| {
                        time_wall(case.warmup, case.repeat, || {
                            bn.backward_fused_slice(
                                &x,
                                &y,
                                &dy,
                                &dims,
                                act,
                                Mode::Train,
                                &mut dx,
                                dz.as_deref_mut().map(Vec::as_mut_slice),
                                &mut dw,
                                &mut db,
                            )
                        })
                    });
                let unfused = time_wall(case.warmup, case.repeat, || {
                    if act == Activation::Identity {
                        return bn.backward_slice(
                            &x,
                            &dy,
                            &dims,
                            Mode::Train,
                            &mut dx,
                            &mut dw,
                            &mut db,
                        );
                    }
                    cpu_gate(&y, &dy, act, &mut t);
                    bn.backward_slice(&x, &t, &dims, Mode::Train, &mut dx, &mut dw, &mut db)
                });
                (fused, unfused)
            }
        };
        pb.inc(1);
        push_pair(
            run,
            case,
            (op, fusion),
            ("cpu", &device, None),
            copy_gbps,
            fused,
            unfused,
            &what,
        );
    }
}

/// The GPU tensors of one shape.
struct Tensors {
    x: GpuTensor,
    z: GpuTensor,
    dy: GpuTensor,
    y: GpuTensor,
    dx: GpuTensor,
    g: GpuTensor,
}

impl Tensors {
    fn new(ctx: &GpuContext, case: &Case<'_>) -> Result<Self> {
        let dims = case.shape.dims(case.layout);
        let n = case.shape.len();
        let filled =
            |seed| GpuTensor::from_slice_as(ctx, &data(n, seed), &dims, case.layout, case.dtype);
        let empty = || GpuTensor::uninit_as(ctx, &dims, case.layout, case.dtype);
        Ok(Self {
            x: filled(1)?,
            z: filled(3)?,
            dy: filled(2)?,
            y: empty()?,
            dx: empty()?,
            g: empty()?,
        })
    }
}

/// Measures one adapter on one shape, fused against unfused.
pub fn bench_gpu(
    ctx: &GpuContext,
    case: &Case<'_>,
    fusion: Fusion,
    run: &mut Run,
    pb: &ProgressBar,
) {
    let backend = ctx.adapter_info().backend.to_string();
    let device = ctx.name().to_string();
    let what = format!("{} {} {}", ctx.label(), case.shape.name(), case.layout);
    let setup = Tensors::new(ctx, case).and_then(|d| {
        let (bn, saved) = gpu_layer(ctx, case)?;
        let tail = GpuUnfused::new(ctx, case.dtype)?;
        Ok((d, bn, saved, tail))
    });
    let (d, mut bn, mut saved, tail) = match setup {
        Ok(s) => s,
        Err(error) => {
            run.skips.push(Skip { what, error });
            pb.inc(4);
            return;
        }
    };
    let copy_gbps = gpu_copy_gbps(ctx, case, (&d.x, &d.y), &what, run);
    pb.inc(1);
    let z = fusion.residual.then_some(&d.z);
    let act = fusion.activation;
    for op in Operation::ALL {
        pb.set_message(format!(
            "{} fused {} {}",
            ctx.label(),
            op.name(),
            case.shape.name()
        ));
        let forward = |bn: &mut GpuBatchNorm,
                       saved: &mut GpuSavedStats,
                       mode: Mode,
                       fused: bool| {
            ctx.run("forward", |enc| {
                match (mode, fused) {
                    (Mode::Train, true) => {
                        return bn.record_forward_train_fused(enc, &d.x, z, act, &d.y, Some(saved));
                    }
                    (Mode::Eval, true) => {
                        return bn.record_forward_eval_fused(enc, &d.x, z, act, &d.y, Some(saved));
                    }
                    (Mode::Train, false) => {
                        bn.record_forward_train(enc, &d.x, &d.y, Some(saved))?
                    }
                    (Mode::Eval, false) => bn.record_forward_eval(enc, &d.x, &d.y, Some(saved))?,
                }
                if let Some(z) = z {
                    tail.record_add(enc, z, &d.y)?;
                }
                if act == Activation::Relu {
                    tail.record_relu(enc, &d.y)?;
                }
                Ok(())
            })
        };
        let mode = if op == Operation::EvalForward {
            Mode::Eval
        } else {
            Mode::Train
        };
        let times: Vec<_> = match op {
            Operation::TrainForward | Operation::EvalForward => {
                let f = time_sources(ctx, case, || forward(&mut bn, &mut saved, mode, true));
                let u = time_sources(ctx, case, || forward(&mut bn, &mut saved, mode, false));
                f.into_iter()
                    .zip(u)
                    .map(|((s, f), (_, u))| (s, f, u))
                    .collect()
            }
            Operation::Backward => match forward(&mut bn, &mut saved, Mode::Train, true) {
                Ok(()) => {
                    let dz = fusion.residual.then_some(&d.g);
                    let f = time_sources(ctx, case, || {
                        ctx.run("fused backward", |enc| {
                            bn.record_backward_fused(
                                enc, &d.x, &d.y, &d.dy, fusion, &saved, &d.dx, dz,
                            )
                        })
                    });
                    let u = time_sources(ctx, case, || {
                        ctx.run("unfused backward", |enc| {
                            if act == Activation::Identity {
                                return bn.record_backward(enc, &d.x, &d.dy, &saved, &d.dx);
                            }
                            tail.record_relu_backward(enc, &d.y, &d.dy, &d.g)?;
                            bn.record_backward(enc, &d.x, &d.g, &saved, &d.dx)
                        })
                    });
                    f.into_iter()
                        .zip(u)
                        .map(|((s, f), (_, u))| (s, f, u))
                        .collect()
                }
                Err(error) => {
                    run.skips.push(Skip {
                        what: format!("{what} fused training forward before the backward"),
                        error,
                    });
                    Vec::new()
                }
            },
        };
        pb.inc(1);
        for (source, fused, unfused) in times {
            let copy = copy_gbps
                .iter()
                .find(|(s, _)| *s == source)
                .map_or(f64::NAN, |&(_, g)| g);
            push_pair(
                run,
                case,
                (op, fusion),
                (&backend, &device, Some(source)),
                copy,
                fused,
                unfused,
                &what,
            );
        }
    }
}

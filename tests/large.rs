//! A tensor larger than one storage binding (over 128 MiB), on every
//! adapter: bound in chunks of rows, every operation in both layouts agrees
//! with statistics computed on the host in f64 (all channels) and with the
//! formulas at sampled elements.
#![allow(clippy::needless_range_loop)] // per-channel vectors side by side

mod common;
use common::*;
use wgpu_batchnorm::{BatchNormConfig, BatchNormState, GpuBatchNorm, GpuTensor, Layout};

const C: usize = 4;
/// Elements per channel in one sample (channels-first) or samples' positions.
const INNER: usize = 1 << 20;
/// The binding size the test cuts at: the adapter's, or 128 MiB where it
/// allows more, so that the tensor passes it on any device.
const MAX_BINDING: u64 = 128 << 20;

/// A value in [-1, 1) from an index (a cheap hash).
fn unit(i: u64, salt: u64) -> f32 {
    let mut z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    z ^= z >> 29;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 32;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Per-channel f64 sums of what the passes reduce.
struct Host {
    mean: Vec<f64>,
    var: Vec<f64>,
    sum_dy: Vec<f64>,
    sum_dy_xmu: Vec<f64>,
}

fn host_stats(x: &[f32], dy: &[f32], channel: impl Fn(usize) -> usize) -> Host {
    let (mut n, mut s) = (vec![0f64; C], vec![0f64; C]);
    for (i, &v) in x.iter().enumerate() {
        n[channel(i)] += 1.0;
        s[channel(i)] += f64::from(v);
    }
    let mean: Vec<f64> = s.iter().zip(&n).map(|(s, n)| s / n).collect();
    let (mut ss, mut sd, mut sdx) = (vec![0f64; C], vec![0f64; C], vec![0f64; C]);
    for (i, (&v, &g)) in x.iter().zip(dy).enumerate() {
        let c = channel(i);
        let d = f64::from(v) - mean[c];
        ss[c] += d * d;
        sd[c] += f64::from(g);
        sdx[c] += f64::from(g) * d;
    }
    Host {
        var: ss.iter().zip(&n).map(|(s, n)| s / n).collect(),
        mean,
        sum_dy: sd,
        sum_dy_xmu: sdx,
    }
}

fn close(what: &str, got: f32, want: f64, tol: f64) {
    assert!(
        (f64::from(got) - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: {got} vs {want}"
    );
}

fn run(layout: Layout) {
    let ctx_count = gpu_contexts().len();
    for ctx in gpu_contexts() {
        let limit = ctx
            .limits()
            .max_storage_buffer_binding_size
            .min(MAX_BINDING);
        let row = (C * INNER * 4) as u64;
        let n = (limit / row + 2) as usize;
        let dims = match layout {
            Layout::ChannelsFirst => vec![n, C, INNER],
            Layout::ChannelsLast => vec![n, INNER, C],
        };
        let len = n * C * INNER;
        let channel = |i: usize| match layout {
            Layout::ChannelsFirst => (i / INNER) % C,
            Layout::ChannelsLast => i % C,
        };
        assert!(len as u64 * 4 > limit && len as u64 * 4 > 128 << 20);
        let x: Vec<f32> = (0..len)
            .map(|i| {
                let c = channel(i) as f32;
                (c - 1.5) * 40.0 + (1.0 + c) * unit(i as u64, 1)
            })
            .collect();
        let dy: Vec<f32> = (0..len).map(|i| unit(i as u64, 2)).collect();
        let h = host_stats(&x, &dy, channel);

        let config = BatchNormConfig::new(C).with_layout(layout);
        let mut bn = GpuBatchNorm::new(ctx, config.clone()).unwrap();
        bn.set_max_binding_bytes(Some(limit)).unwrap();
        let weight = vec![0.5, 1.0, 1.5, -2.0];
        let bias = vec![0.25, -1.0, 0.0, 3.0];
        let mut state = BatchNormState::new(&config);
        state.weight = Some(weight.clone());
        state.bias = Some(bias.clone());
        bn.set_state(&state).unwrap();
        let gx = GpuTensor::from_slice(ctx, &x, &dims, layout).unwrap();
        let gdy = GpuTensor::from_slice(ctx, &dy, &dims, layout).unwrap();

        let fwd = bn.run_forward_train(&gx).unwrap();
        let chunks = bn
            .last_dispatches()
            .iter()
            .filter(|d| d.kernel.starts_with("stats_partial"))
            .count();
        assert!(chunks >= 2, "{}: {:?}", ctx.label(), bn.last_dispatches());
        let saved = fwd.saved.read().unwrap().unwrap();
        let m = (n * INNER) as f64;
        let invstd: Vec<f64> = h.var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        for c in 0..C {
            close("mean", saved.mean[c], h.mean[c], 1e-6);
            close("invstd", saved.invstd[c], invstd[c], 1e-5);
        }
        let s = bn.state().unwrap();
        for c in 0..C {
            close(
                "running_mean",
                s.running_mean.as_ref().unwrap()[c],
                0.1 * h.mean[c],
                1e-6,
            );
            let rv = 0.9 + 0.1 * h.var[c] * m / (m - 1.0);
            close("running_var", s.running_var.as_ref().unwrap()[c], rv, 1e-5);
        }
        let y = fwd.y.to_vec().unwrap();
        let samples: Vec<usize> = (0..len).step_by(7919).chain([len - 1]).collect();
        for &i in &samples {
            let c = channel(i);
            let want = (f64::from(x[i]) - h.mean[c]) * invstd[c] * f64::from(weight[c])
                + f64::from(bias[c]);
            close("y", y[i], want, 1e-4);
        }
        drop(y);

        let g = bn.run_backward(&gx, &gdy, &fwd.saved).unwrap();
        let dweight = g.dweight.unwrap().to_vec().unwrap();
        let dbias = g.dbias.unwrap().to_vec().unwrap();
        for c in 0..C {
            close("dbias", dbias[c], h.sum_dy[c], 1e-4);
            close("dweight", dweight[c], h.sum_dy_xmu[c] * invstd[c], 1e-4);
        }
        let dx = g.dx.to_vec().unwrap();
        for &i in &samples {
            let c = channel(i);
            let xhat = (f64::from(x[i]) - h.mean[c]) * invstd[c];
            let want = f64::from(weight[c]) * invstd[c] / m
                * (m * f64::from(dy[i]) - h.sum_dy[c] - xhat * h.sum_dy_xmu[c] * invstd[c]);
            close("dx", dx[i], want, 1e-4);
        }
        drop(dx);

        let ye = bn.run_forward_eval(&gx).unwrap().y.to_vec().unwrap();
        let (rm, rv) = (s.running_mean.unwrap(), s.running_var.unwrap());
        for &i in &samples {
            let c = channel(i);
            let inv = 1.0 / (f64::from(rv[c]) + 1e-5).sqrt();
            let want = (f64::from(x[i]) - f64::from(rm[c])) * inv * f64::from(weight[c])
                + f64::from(bias[c]);
            close("y_eval", ye[i], want, 1e-4);
        }
    }
    if gpu_required() {
        assert!(ctx_count > 0);
    }
}

/// One test for both layouts: one tensor of this size in memory at a time,
/// and one thread on each adapter.
#[test]
fn over_128_mib_both_layouts() {
    run(Layout::ChannelsFirst);
    run(Layout::ChannelsLast);
}

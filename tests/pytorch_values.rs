//! A hand-checkable case with values computed by PyTorch, on every backend.
//!
//! The expected values were printed by scripts/torch_values.py:
//!
//! ```python
//! bn = torch.nn.BatchNorm1d(3, eps=1e-5, momentum=0.1).double()
//! bn.weight.data = torch.tensor([1.0, 0.5, -2.0]); bn.bias.data = torch.tensor([0.0, 0.1, 0.2])
//! x = torch.tensor(X).reshape(2, 3, 2).requires_grad_()
//! y = bn(x); y.backward(torch.tensor(DY).reshape(2, 3, 2))   # training
//! bn_eval = fresh BatchNorm1d with running stats zeros/ones, .eval()
//! ```

mod common;
use common::*;
use ndarray::ArrayD;
use wgpu_batchnorm::{BatchNormConfig, BatchNormState, Mode};

// torch 2.15.0+cu132 float64, BatchNorm1d(3, eps=1e-05, momentum=0.1)
const X: [f32; 12] = [
    1.0, 2.0, -0.5, 0.25, 3.0, 3.5, 4.0, -1.0, 0.75, -2.0, 2.0, 6.0,
];
const DY: [f32; 12] = [
    0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, -1.0, 1.1, 1.2,
];
const Y_TRAIN: [f64; 12] = [
    -0.277349671,
    0.277349671,
    0.0398073526,
    0.400963237,
    1.04818698,
    0.369637395,
    1.38674836,
    -1.38674836,
    0.641733827,
    -0.682504416,
    2.40528614,
    -3.02311051,
];
const SAVE_MEAN: [f64; 3] = [1.5, -0.375, 3.625];
const SAVE_INVSTD: [f64; 3] = [0.554699343, 0.963082358, 0.678549582];
const RUNNING_MEAN_OUT: [f64; 3] = [0.15, -0.0375, 0.3625];
const RUNNING_VAR_OUT: [f64; 3] = [1.33333333, 1.04375, 1.18958333];
const DX_TRAIN: [f64; 12] = [
    0.160009189,
    -0.160009189,
    0.112010297,
    -0.0785103039,
    1.36588672,
    -0.0253844718,
    0.0320030668,
    -0.0320030668,
    0.00314380664,
    -0.0366437993,
    -1.00854771,
    -0.331954534,
];
const DWEIGHT: [f64; 3] = [1.99691763, 2.74478472, 0.882114456];
const DBIAS: [f64; 3] = [-0.2, 0.6, 2.4];
const Y_EVAL: [f64; 12] = [
    0.999995,
    1.99999,
    -0.14999875,
    0.224999375,
    -5.79997,
    -6.799965,
    3.99998,
    -0.999995,
    0.474998125,
    -0.899995,
    -3.79998,
    -11.79994,
];
const DX_EVAL: [f64; 12] = [
    0.0999995, -0.199999, 0.14999925, 0.199999, 0.999995, -1.199994, 0.6999965, -0.799996,
    0.44999775, -0.4999975, -2.199989, -2.399988,
];
const DWEIGHT_EVAL: [f64; 3] = [3.2999835, 2.62498688, 9.99995];

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn matches_pytorch_on_every_backend() {
    let config = BatchNormConfig::new(3);
    let mut state = BatchNormState::new(&config);
    state.weight = Some(vec![1.0, 0.5, -2.0]);
    state.bias = Some(vec![0.0, 0.1, 0.2]);
    let x = ArrayD::from_shape_vec(vec![2, 3, 2], X.to_vec()).unwrap();
    let dy = ArrayD::from_shape_vec(vec![2, 3, 2], DY.to_vec()).unwrap();
    let close = |name: &str, what: &str, got: &[f32], want: &[f64]| {
        all_close(what, got, &f32s(want), TOL, TOL).unwrap_or_else(|e| panic!("{name}: {e}"));
    };
    let bs = backends(&config, &state);
    assert_eq!(bs.len(), 1 + gpu_contexts().len());
    for mut b in bs {
        let name = b.backend_name();
        close(
            &name,
            "y_eval",
            &flat(&b.forward_eval(x.view()).unwrap()),
            &Y_EVAL,
        );
        let ge = b.backward(x.view(), dy.view(), Mode::Eval).unwrap();
        close(&name, "dx_eval", &flat(&ge.dx), &DX_EVAL);
        close(&name, "dweight_eval", &ge.dweight.unwrap(), &DWEIGHT_EVAL);
        close(&name, "dbias_eval", &ge.dbias.unwrap(), &DBIAS);

        close(
            &name,
            "y",
            &flat(&b.forward_train(x.view()).unwrap()),
            &Y_TRAIN,
        );
        let saved = b.saved_stats().unwrap().unwrap();
        close(&name, "save_mean", &saved.mean, &SAVE_MEAN);
        close(&name, "save_invstd", &saved.invstd, &SAVE_INVSTD);
        let s = b.state().unwrap();
        close(
            &name,
            "running_mean",
            &s.running_mean.unwrap(),
            &RUNNING_MEAN_OUT,
        );
        close(
            &name,
            "running_var",
            &s.running_var.unwrap(),
            &RUNNING_VAR_OUT,
        );
        assert_eq!(s.num_batches_tracked, Some(1), "{name}");
        let g = b.backward(x.view(), dy.view(), Mode::Train).unwrap();
        close(&name, "dx", &flat(&g.dx), &DX_TRAIN);
        close(&name, "dweight", &g.dweight.unwrap(), &DWEIGHT);
        close(&name, "dbias", &g.dbias.unwrap(), &DBIAS);
    }
}

#[test]
fn momentum_none_is_the_cumulative_average() {
    // After k steps with momentum None the running mean is the plain average
    // of the k batch means (PyTorch: factor 1/num_batches_tracked).
    let config = BatchNormConfig::new(2).with_momentum(None);
    let state = BatchNormState::new(&config);
    for mut b in backends(&config, &state) {
        let mut means = Vec::new();
        for k in 0..4 {
            let x = ArrayD::from_shape_fn(vec![3, 2, 2], |i| {
                (i[0] * 2 + i[2]) as f32 * (k + 1) as f32 + i[1] as f32
            });
            b.forward_train(x.view()).unwrap();
            means.push(b.saved_stats().unwrap().unwrap().mean);
        }
        let s = b.state().unwrap();
        assert_eq!(s.num_batches_tracked, Some(4));
        let avg: Vec<f32> = (0..2)
            .map(|c| means.iter().map(|m| m[c]).sum::<f32>() / 4.0)
            .collect();
        all_close("running_mean", &s.running_mean.unwrap(), &avg, TOL, TOL)
            .unwrap_or_else(|e| panic!("{}: {e}", b.backend_name()));
    }
}

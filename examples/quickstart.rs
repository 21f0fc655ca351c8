//! Training forward, backward and evaluation on the default adapter, checked
//! against the CPU reference.
//!
//! ```text
//! cargo run --release --example quickstart
//! WGPU_BACKEND=gl cargo run --release --example quickstart
//! ```

use ndarray::{Array, IxDyn};
use wgpu_batchnorm::{
    BatchNormBackend, BatchNormConfig, CpuReference, GpuBatchNorm, GpuContext, GpuTensor, Mode,
};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.label());

    let config = BatchNormConfig::new(16);
    let mut bn = GpuBatchNorm::new(&ctx, config.clone())?;
    let dims = [8, 16, 24, 24];
    let x = Array::from_shape_fn(IxDyn(&dims), |i| {
        ((i[0] * 31 + i[1] * 7 + i[2] * 3 + i[3]) % 23) as f32 * 0.25 + i[1] as f32
    });
    let dy = Array::from_shape_fn(IxDyn(&dims), |i| ((i[0] + i[2] * i[3]) % 5) as f32 - 2.0);

    // Device-resident: upload once, chain calls, read back at the end.
    let gx = GpuTensor::from_array(&ctx, x.view(), config.layout)?;
    let gdy = GpuTensor::from_array(&ctx, dy.view(), config.layout)?;
    let fwd = bn.run_forward_train(&gx)?; // y and the statistics its backward needs
    let grads = bn.run_backward(&gx, &gdy, &fwd.saved)?;
    let y = fwd.y;
    let y_eval = bn.run_forward_eval(&gx)?.y;

    // The same calls on the f64 CPU reference.
    let mut cpu = CpuReference::new(config)?;
    let y_ref = cpu.forward_train(x.view())?;
    let g_ref = cpu.backward(x.view(), dy.view(), Mode::Train)?;
    let y_eval_ref = cpu.forward_eval(x.view())?;

    let flat = |a: &ndarray::ArrayD<f32>| a.iter().copied().collect::<Vec<_>>();
    println!(
        "y        max |gpu - cpu| = {:.3e}",
        max_abs_diff(&flat(&y.to_array()?), &flat(&y_ref))
    );
    println!(
        "dx       max |gpu - cpu| = {:.3e}",
        max_abs_diff(&flat(&grads.dx.to_array()?), &flat(&g_ref.dx))
    );
    let dw = grads.dweight.expect("affine").to_vec()?;
    println!(
        "dweight  max |gpu - cpu| = {:.3e}",
        max_abs_diff(&dw, &g_ref.dweight.expect("affine"))
    );
    println!(
        "y_eval   max |gpu - cpu| = {:.3e}",
        max_abs_diff(&flat(&y_eval.to_array()?), &flat(&y_eval_ref))
    );
    let state = bn.state()?;
    println!(
        "running_mean[..4] = {:?}",
        &state.running_mean.expect("tracked")[..4]
    );
    println!("num_batches_tracked = {:?}", state.num_batches_tracked);
    Ok(())
}

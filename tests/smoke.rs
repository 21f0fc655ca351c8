mod common;
use common::*;
use wgpu_batchnorm::*;

#[test]
fn smoke() {
    let cfg = BatchNormConfig::new(3);
    let mut r = rng(1);
    let st = random_state(&mut r, &cfg, 0);
    let x = normal(&mut r, &[4, 3, 5, 7], 1.0, 2.0);
    let dy = normal(&mut r, &[4, 3, 5, 7], 0.0, 1.0);
    let mut bs = backends(&cfg, &st);
    let mut outs = vec![];
    for b in &mut bs {
        let y = b.forward_train(x.view()).unwrap();
        let g = b.backward(x.view(), dy.view(), Mode::Train).unwrap();
        let ye = b.forward_eval(x.view()).unwrap();
        let ge = b.backward(x.view(), dy.view(), Mode::Eval).unwrap();
        outs.push((b.backend_name(), y, g, ye, ge, b.state().unwrap()));
    }
    for o in &outs[1..] {
        println!("{}", o.0);
        all_close("y", &flat(&o.1), &flat(&outs[0].1), TOL, TOL).unwrap();
        all_close("dx", &flat(&o.2.dx), &flat(&outs[0].2.dx), TOL, TOL).unwrap();
        all_close("dw", o.2.dweight.as_ref().unwrap(), outs[0].2.dweight.as_ref().unwrap(), TOL, TOL).unwrap();
        all_close("ye", &flat(&o.3), &flat(&outs[0].3), TOL, TOL).unwrap();
        all_close("dxe", &flat(&o.4.dx), &flat(&outs[0].4.dx), TOL, TOL).unwrap();
        all_close("rm", o.5.running_mean.as_ref().unwrap(), outs[0].5.running_mean.as_ref().unwrap(), TOL, TOL).unwrap();
        all_close("rv", o.5.running_var.as_ref().unwrap(), outs[0].5.running_var.as_ref().unwrap(), TOL, TOL).unwrap();
    }
    assert_eq!(outs.len(), 3);
}

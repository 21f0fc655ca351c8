#!/usr/bin/env python3
"""Print PyTorch's float64 BatchNorm1d results for one tiny hand-written case
as Rust array literals, ready to paste into a Rust unit test.

    /work/venv/bin/python scripts/torch_values.py

Case: x of shape (N=2, C=3, L=2) (NCL, channel axis 1), eps 1e-5, momentum
0.1, weight [1.0, 0.5, -2.0], bias [0.0, 0.1, 0.2], running_mean zeros,
running_var ones, num_batches_tracked 0. Every array is printed flattened in
row-major order of its shape; per-channel arrays have length C = 3.
"""

import torch

torch.set_default_dtype(torch.float64)

X = [
    [[1.0, 2.0], [-0.5, 0.25], [3.0, 3.5]],
    [[4.0, -1.0], [0.75, -2.0], [2.0, 6.0]],
]
DY = [
    [[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]],
    [[0.7, -0.8], [0.9, -1.0], [1.1, 1.2]],
]
WEIGHT = [1.0, 0.5, -2.0]
BIAS = [0.0, 0.1, 0.2]
EPS = 1e-5
MOMENTUM = 0.1


def lit(v: float) -> str:
    s = f"{v:.9g}"
    if s in ("-0", "0"):
        return s + ".0"
    if not any(ch in s for ch in ".eEn"):
        s += ".0"
    return s


def rust(name: str, t: torch.Tensor, shape_note: str) -> str:
    flat = t.detach().reshape(-1).tolist()
    return (f"// {shape_note}\n"
            f"const {name}: [f64; {len(flat)}] = [{', '.join(lit(v) for v in flat)}];")


def module() -> torch.nn.BatchNorm1d:
    m = torch.nn.BatchNorm1d(3, eps=EPS, momentum=MOMENTUM)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(WEIGHT))
        m.bias.copy_(torch.tensor(BIAS))
    return m  # running_mean zeros, running_var ones, num_batches_tracked 0


def main() -> None:
    x0 = torch.tensor(X)
    dy = torch.tensor(DY)

    m = module().train()
    x = x0.clone().requires_grad_(True)
    y = m(x)
    y.backward(dy)

    me = module().eval()
    xe = x0.clone().requires_grad_(True)
    ye = me(xe)
    ye.backward(dy)

    red = (0, 2)
    mean = x0.mean(dim=red)
    invstd = 1.0 / torch.sqrt(x0.var(dim=red, unbiased=False) + EPS)

    print(f"// torch {torch.__version__} float64, BatchNorm1d(3, eps={EPS}, momentum={MOMENTUM})")
    print("// x (2, 3, 2) NCL; weight [1.0, 0.5, -2.0]; bias [0.0, 0.1, 0.2];")
    print("// running_mean [0, 0, 0]; running_var [1, 1, 1]; num_batches_tracked 0 -> 1")
    print(rust("X", x0, "input x, shape (2, 3, 2)"))
    print(rust("DY", dy, "upstream gradient dy, shape (2, 3, 2)"))
    print(rust("Y_TRAIN", y, "training forward y, shape (2, 3, 2)"))
    print(rust("SAVE_MEAN", mean, "batch mean, per channel"))
    print(rust("SAVE_INVSTD", invstd, "1/sqrt(biased var + eps), per channel"))
    print(rust("RUNNING_MEAN_OUT", m.running_mean, "running_mean after the training call"))
    print(rust("RUNNING_VAR_OUT", m.running_var, "running_var after (unbiased batch var, M = 4)"))
    print(rust("DX_TRAIN", x.grad, "training backward dx, shape (2, 3, 2)"))
    print(rust("DWEIGHT", m.weight.grad, "training dweight"))
    print(rust("DBIAS", m.bias.grad, "training dbias"))
    print(rust("Y_EVAL", ye, "eval forward with running stats zeros/ones, shape (2, 3, 2)"))
    print(rust("DX_EVAL", xe.grad, "eval backward dx, shape (2, 3, 2)"))
    print(rust("DWEIGHT_EVAL", me.weight.grad, "eval dweight"))
    print(rust("DBIAS_EVAL", me.bias.grad, "eval dbias"))


if __name__ == "__main__":
    main()

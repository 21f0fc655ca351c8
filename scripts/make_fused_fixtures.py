#!/usr/bin/env python3
"""Generate the PyTorch parity fixtures of the fused BatchNorm `y = act(BN(x) + z)`.

Run from anywhere (paths are relative to the repository root); it needs only
torch (no numpy, no safetensors package; the writer is make_fold_fixtures.py's):

    /work/venv-torch/bin/python scripts/make_fused_fixtures.py

Every random draw comes from a generator seeded by the case name and all
ground truth is computed in float64 on the CPU, so reruns are byte-identical.

Fixtures: tests/fixtures/fused/<case>.safetensors
-------------------------------------------------
Format `batchnorm-fixture/1` (FIXTURES.md) with two more metadata keys and
three more tensors (scripts/README.md):

- `activation` (`identity` or `relu`) and `residual` (`true` or `false`):
  the fused op is `y = act(bn(x) + z)`, `z` only with the residual.
- `z` (input, storage dtype, shape of `x`) with the residual; `dz` and
  `dz_eval` (expected, storage dtype): the gradient of `z`, in training and
  in evaluation.
- `y`, `dx`, `dweight`, `dbias`, `y_eval`, `dx_eval`, `dweight_eval`,
  `dbias_eval` are the fused op's, by float64 autograd through
  `F.relu(bn(x) + z)` (or `bn(x) + z`, `F.relu(bn(x))`, `bn(x)`) from the
  stored inputs; `save_mean`, `save_invstd` and the running statistics are
  the BatchNorm's, as in the plain fixtures. Evaluation uses the input
  running statistics.

Checks before a file is written:
- the float64 results equal the formulas of DESIGN.md applied to the gated
  gradient `g = dy * (y > 0 or y is NaN)` (PyTorch's `threshold_backward`);
- the ReLU mask of the stored (rounded) `y` equals the float64 one, so a
  backend that takes the stored `y` as the backward's mask gates exactly
  where PyTorch did;
- PyTorch's own float32 kernels on the stored inputs (outputs rounded to the
  storage dtype) are within the FIXTURES.md tolerance (f16 tensors 5e-3,
  everything else 1e-4): a fixture float32 cannot meet would be unfair.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from make_fold_fixtures import decimal, save_safetensors

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "fused"
FORMAT = "batchnorm-fixture/1"
SOURCE = f"torch {torch.__version__.split('+')[0]} float64"
STORAGE = {"f32": torch.float32, "f16": torch.float16}

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


@dataclasses.dataclass
class Case:
    name: str
    shape: tuple  # logical shape, channels-first (N, C, ...)
    fusion: str  # none, relu, add, add_relu
    layout: str = "NCHW"
    dtype: str = "f32"
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track: bool = True
    nbt: int = 0
    nan: bool = False  # a NaN in one element of channel 1's x
    salt: int = 0  # added to the seed

    @property
    def residual(self) -> bool:
        return self.fusion.startswith("add")

    @property
    def relu(self) -> bool:
        return self.fusion.endswith("relu")


def cases() -> list[Case]:
    V = (2, 3, 4, 5)
    return [
        # every fusion, NCHW f32
        Case("none_nchw", V, "none"),
        Case("relu_nchw", V, "relu"),
        Case("add_nchw", V, "add"),
        Case("add_relu_nchw", V, "add_relu"),
        # channels-last, BatchNorm1d and 3d
        Case("add_relu_nhwc", V, "add_relu", layout="NHWC"),
        Case("relu_nhwc", (3, 4, 3, 3), "relu", layout="NHWC"),
        Case("add_relu_bn1d", (16, 4), "add_relu"),
        Case("add_relu_bn3d", (2, 3, 2, 3, 4), "add_relu"),
        # configuration flags
        Case("add_relu_affine_off", V, "add_relu", affine=False),
        Case("add_relu_no_tracking", V, "add_relu", track=False),
        Case("add_relu_momentum_none", V, "add_relu", momentum=None, nbt=3),
        Case("add_relu_nan_channel", V, "add_relu", nan=True),
        # f16 storage
        Case("f16_add_relu", V, "add_relu", dtype="f16"),
        Case("f16_relu_nhwc", V, "relu", layout="NHWC", dtype="f16"),
        Case("f16_add_nlc", (4, 3, 6), "add", layout="NHWC", dtype="f16"),
    ]


def bn_class(ndim: int):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def to_storage_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Channels-first tensor -> stored layout (channel last for NHWC), contiguous."""
    if layout == "NHWC" and t.dim() >= 3:
        t = t.movedim(1, -1)
    return t.contiguous()


def from_storage_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC" and t.dim() >= 3:
        t = t.movedim(-1, 1)
    return t.contiguous()


def new_module(case: Case, params: dict, dtype: torch.dtype):
    C = case.shape[1]
    m = bn_class(len(case.shape))(
        C,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track,
        dtype=dtype,
    )
    with torch.no_grad():
        if case.affine:
            m.weight.copy_(params["weight"])
            m.bias.copy_(params["bias"])
        if case.track:
            m.running_mean.copy_(params["running_mean"])
            m.running_var.copy_(params["running_var"])
            m.num_batches_tracked.fill_(case.nbt)
    return m


def run_fused(case: Case, m, x, z, dy):
    """`act(m(x) + z)` and its autograd gradients for the upstream `dy`:
    (y, dx, dz, dweight, dbias), channels-first, detached."""
    x = x.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True) if case.residual else None
    v = m(x)
    if case.residual:
        v = v + z
    y = F.relu(v) if case.relu else v
    y.backward(dy)
    grad = lambda p: p.grad.detach().clone() if p is not None and p.grad is not None else None
    dw = grad(m.weight) if case.affine else None
    db = grad(m.bias) if case.affine else None
    return y.detach(), x.grad.detach(), grad(z), dw, db


def mask(y: torch.Tensor) -> torch.Tensor:
    """Where the ReLU lets the gradient through: y > 0, or y NaN."""
    return (y > 0) | torch.isnan(y)


def self_check(case: Case, weight, x, dy, y, dx, dz, dw, db, center, invstd, batch: bool):
    """The autograd results against DESIGN.md's backward of the gated
    gradient `g` (batch statistics with `batch`, else the running ones)."""
    C = case.shape[1]
    red = tuple(d for d in range(len(case.shape)) if d != 1)
    M = x.numel() // C
    bsh = (1, C) + (1,) * (len(case.shape) - 2)
    g = dy * mask(y) if case.relu else dy
    if case.residual:
        assert torch.equal(dz, g), case.name
    xc = x - center.view(bsh)
    S1, S2 = g.sum(dim=red), (g * xc).sum(dim=red)
    k = (invstd * weight if case.affine else invstd).view(bsh)
    if batch:
        want = k * (g - (S1 / M).view(bsh) - xc * (invstd**2 * S2 / M).view(bsh))
    else:
        want = k * g
    assert torch.allclose(dx, want, rtol=1e-8, atol=1e-8, equal_nan=True), case.name
    if case.affine:
        assert torch.allclose(db, S1, rtol=1e-9, atol=1e-9, equal_nan=True), case.name
        assert torch.allclose(dw, S2 * invstd, rtol=1e-9, atol=1e-9, equal_nan=True), case.name


def build_case(case: Case):
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + case.salt)
    C = case.shape[1]
    sdt = STORAGE[case.dtype]
    bsh = (1, C) + (1,) * (len(case.shape) - 2)
    red = tuple(d for d in range(len(case.shape)) if d != 1)

    mu = torch.randn(C, generator=g, dtype=torch.float64).view(bsh)
    sigma = (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5).view(bsh)
    x = mu + sigma * torch.randn(case.shape, generator=g, dtype=torch.float64)
    if case.nan:
        idx = (min(1, case.shape[0] - 1), 1) + tuple(min(2, s - 1) for s in case.shape[2:])
        x[idx] = float("nan")
    dy = torch.randn(case.shape, generator=g, dtype=torch.float64)
    z = torch.randn(case.shape, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    w[2::3] *= -1.0
    params = {
        "weight": w.float(),
        "bias": (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).float(),
        "running_mean": (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).float(),
        "running_var": (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5).float(),
    }

    # Inputs rounded to the storage dtype; float64 channels-first copies of what is stored.
    st = lambda t: to_storage_layout(t.to(sdt), case.layout)
    t = {"x": st(x), "dy": st(dy)}
    if case.residual:
        t["z"] = st(z)
    if case.affine:
        t["weight"], t["bias"] = params["weight"], params["bias"]
    if case.track:
        t["running_mean"], t["running_var"] = params["running_mean"], params["running_var"]
    wide = lambda k: from_storage_layout(t[k], case.layout).double()
    x64, dy64 = wide("x"), wide("dy")
    z64 = wide("z") if case.residual else None
    p64 = {k: v.double() for k, v in params.items()}

    # Training: batch statistics.
    m = new_module(case, p64, torch.float64).train()
    y, dx, dz, dw, db = run_fused(case, m, x64, z64, dy64)
    mean = x64.mean(dim=red)
    invstd = 1.0 / torch.sqrt(x64.var(dim=red, unbiased=False) + case.eps)
    self_check(case, p64["weight"], x64, dy64, y, dx, dz, dw, db, mean, invstd, batch=True)
    check_mask(case, y, sdt)
    t["y"], t["dx"] = st(y), st(dx)
    if case.residual:
        t["dz"] = st(dz)
    t["save_mean"], t["save_invstd"] = mean.float(), invstd.float()
    if case.affine:
        t["dweight"], t["dbias"] = dw.float(), db.float()
    if case.track:
        assert int(m.num_batches_tracked) == case.nbt + 1
        t["running_mean_out"] = m.running_mean.detach().float()
        t["running_var_out"] = m.running_var.detach().float()

    # Evaluation with the input running statistics.
    if case.track:
        me = new_module(case, p64, torch.float64).eval()
        ye, dxe, dze, dwe, dbe = run_fused(case, me, x64, z64, dy64)
        rm, rv = p64["running_mean"], p64["running_var"]
        inv = 1.0 / torch.sqrt(rv + case.eps)
        self_check(case, p64["weight"], x64, dy64, ye, dxe, dze, dwe, dbe, rm, inv, batch=False)
        check_mask(case, ye, sdt)
        t["y_eval"], t["dx_eval"] = st(ye), st(dxe)
        if case.residual:
            t["dz_eval"] = st(dze)
        if case.affine:
            t["dweight_eval"], t["dbias_eval"] = dwe.float(), dbe.float()

    meta = {
        "format": FORMAT,
        "layout": case.layout,
        "eps": decimal(case.eps),
        "momentum": "none" if case.momentum is None else decimal(case.momentum),
        "affine": "true" if case.affine else "false",
        "track_running_stats": "true" if case.track else "false",
        "num_batches_tracked": str(case.nbt if case.track else 0),
        "dtype": case.dtype,
        "activation": "relu" if case.relu else "identity",
        "residual": "true" if case.residual else "false",
        "source": SOURCE,
        "case": case.name,
    }
    if case.track:
        meta["num_batches_tracked_out"] = str(case.nbt + 1)
    return t, meta


def check_mask(case: Case, y: torch.Tensor, sdt) -> None:
    """The stored y gates where the float64 y did (a positive y that rounds
    to 0 would make the stored mask stop a gradient that PyTorch let through)."""
    if case.relu:
        stored = y.to(sdt).double()
        assert torch.equal(mask(stored), mask(y)), f"{case.name}: the rounded y changes the ReLU mask"


def float32_misses(case: Case, t: dict) -> list[str]:
    """PyTorch's float32 kernels on the stored inputs: the expected tensors
    they miss by more than the FIXTURES.md tolerance."""
    sdt = STORAGE[case.dtype]
    f32 = lambda k: from_storage_layout(t[k], case.layout).float()
    x, dy = f32("x"), f32("dy")
    z = f32("z") if case.residual else None
    params = {k: t[k] for k in ("weight", "bias", "running_mean", "running_var") if k in t}
    got = {}
    m = new_module(case, params, torch.float32).train()
    y, dx, dz, dw, db = run_fused(case, m, x, z, dy)
    got.update(y=y, dx=dx, dz=dz, dweight=dw, dbias=db)
    if case.track:
        got.update(running_mean_out=m.running_mean, running_var_out=m.running_var)
        y, dx, dz, dw, db = run_fused(case, new_module(case, params, torch.float32).eval(), x, z, dy)
        got.update(y_eval=y, dx_eval=dx, dz_eval=dz, dweight_eval=dw, dbias_eval=db)
    bad = []
    for k, v in got.items():
        if v is None or k not in t:
            continue
        v = v.detach()
        storage = k in ("y", "dx", "dz", "y_eval", "dx_eval", "dz_eval")
        if storage:
            v = to_storage_layout(v.to(sdt), case.layout)
        tol = 5e-3 if storage and case.dtype == "f16" else 1e-4
        gv, want = v.double(), t[k].double()
        same_nan = torch.equal(torch.isnan(gv), torch.isnan(want))
        fin = ~torch.isnan(want)
        err = (gv[fin] - want[fin]).abs()
        if not same_nan or (err > tol + tol * want[fin].abs()).any():
            worst = float(err.max()) if err.numel() else 0.0
            bad.append(f"{k} (max abs err {worst:.3g}, NaNs {'match' if same_nan else 'differ'})")
    return bad


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for case in cases():
        tensors, meta = build_case(case)
        bad = float32_misses(case, tensors)
        if bad:
            raise SystemExit(f"{case.name}: PyTorch float32 misses the tolerance: {bad}")
        path = OUT / f"{case.name}.safetensors"
        save_safetensors(path, tensors, meta)
        size = path.stat().st_size
        total += size
        shape = "x".join(str(s) for s in tensors["x"].shape)
        print(f"{case.name:24s} {case.fusion:8s} {case.layout} {case.dtype} x={shape:10s} {size:6d} B")
    print(f"{len(cases())} fixtures, {total} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

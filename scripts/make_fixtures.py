#!/usr/bin/env python3
"""Generate the PyTorch parity fixtures and checkpoint files for wgpu-batchnorm.

Run from anywhere (paths are relative to the repository root, the parent of
this script's folder):

    python3 -m venv /work/venv && /work/venv/bin/pip install torch safetensors numpy
    /work/venv/bin/python scripts/make_fixtures.py

Every random draw comes from a generator seeded by the case name, and all
ground truth is computed in float64 on the CPU, so reruns are byte-identical.

Fixtures: tests/fixtures/<case>.safetensors
-------------------------------------------
Format `batchnorm-fixture/1`, specified in FIXTURES.md (shared/FIXTURES.md).
In short: inputs `x`, `dy`, `weight`/`bias` (affine), `running_mean`/
`running_var` (tracking); expected training outputs `y`, `dx`, `save_mean`,
`save_invstd`, `dweight`/`dbias` (affine), `running_mean_out`/
`running_var_out` (tracking); expected evaluation outputs (tracking only,
computed with the *input* running statistics) `y_eval`, `dx_eval`,
`dweight_eval`/`dbias_eval` (affine). `x`, `dy`, `y`, `dx`, `y_eval`, `dx_eval`
are in the storage dtype (`dtype` metadata: F32 or F16); every per-channel
tensor is F32. Metadata (all strings): format, layout, eps, momentum, affine,
track_running_stats, num_batches_tracked, num_batches_tracked_out (tracking
only), dtype, expect (error cases only), source, case.

Conventions chosen where FIXTURES.md leaves room:
- `eps` and `momentum` are written as plain positional decimals ("0.00001",
  "0.1"), never in exponent form; `momentum` is "none" for the cumulative
  average.
- Without tracking, `num_batches_tracked` is "0" and `num_batches_tracked_out`
  is absent.
- Error cases (`expect` = "error") hold the inputs and, when tracking, the
  evaluation outputs (evaluation with one value per channel is fine), but no
  training outputs. Their `num_batches_tracked_out` equals
  `num_batches_tracked`: a refused call leaves the state untouched. (PyTorch
  itself bumps the counter before raising; we do not copy that.)
- NHWC fixtures store `x`, `dy`, `y`, `dx`, `y_eval`, `dx_eval` with the channel
  axis last, physically contiguous in that order.
- Size (folder kept under 2 MB): `large_channel` (2,3,100,100) is written
  without tracking (no running stats, no *_eval: 0.96 MB instead of 1.44 MB);
  `wide_channels` is (16,512).
- Every fixture is checked against PyTorch's own float32 CPU kernel within
  the FIXTURES.md tolerance before it is written (`torch_f32_check`); a case
  that float32 cannot meet stops the script. `f16_large_mean` needed a seed
  salt for that (see its entry in `cases()`).
- The files are written by `save_safetensors` below, not by the
  `safetensors` package, whose metadata order (hence bytes) varies per run.

Checkpoints: tests/checkpoints/
-------------------------------
`resnet_bn.safetensors`: the BatchNorm2d part of the state_dict of a small
ResNet-like model (`TinyResNet` below) after 5 SGD training steps, with
PyTorch's full key names:

    <prefix>.weight               F32 (C,)
    <prefix>.bias                 F32 (C,)
    <prefix>.running_mean         F32 (C,)
    <prefix>.running_var          F32 (C,)
    <prefix>.num_batches_tracked  I64 ()   (scalar, value 5)

for prefixes `bn` (C=8), `layer1.0.bn1`, `layer1.0.bn2`, `layer1.1.bn1`,
`layer1.1.bn2` (C=8), `layer2.0.bn1`, `layer2.0.bn2`, `layer2.0.downsample.1`
(C=16). Convolution weights are not stored. Metadata: `format` =
`batchnorm-checkpoint/1`, `source`, `eps` ("0.00001"), `momentum` ("0.1").

`resnet_bn_eval.safetensors`: a check of evaluation with a loaded layer:

    x                  F32 (2, 8, 5, 5)  NCHW input
    y_layer1.0.bn1     F32 (2, 8, 5, 5)  PyTorch eval-mode BatchNorm2d output
                                         of layer `layer1.0.bn1`, computed in
                                         float64 from the F32 state stored in
                                         resnet_bn.safetensors, rounded to F32

Metadata: `format` = `batchnorm-checkpoint-eval/1`, `prefix` =
`layer1.0.bn1`, `eps` ("0.00001"), `layout` ("NCHW"), `checkpoint`
("resnet_bn.safetensors"), `source`. Tolerance: as for F32 fixtures
(atol = rtol = 1e-4).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.numpy import load_file as np_load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CHECKPOINTS = ROOT / "tests" / "checkpoints"
FORMAT = "batchnorm-fixture/1"
SOURCE = f"torch {torch.__version__.split('+')[0]} float64"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


ST_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
}


def save_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """Deterministic safetensors writer.

    The `safetensors` package keeps metadata in a hash map, so its header
    order (and the file bytes) change from run to run. This writes the same
    format with a fixed order: `__metadata__` first (keys sorted), then the
    tensors in data order: by item size, largest first (keeps every tensor
    aligned to its own item size, as the official writer does), then in the
    order given. The header is space-padded to a multiple of 8 bytes.
    Little-endian, C-contiguous data.
    """
    items = list(tensors.items())
    order = sorted(range(len(items)), key=lambda i: (-items[i][1].dtype.itemsize, i))
    header = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs, off = [], 0
    for i in order:
        name, a = items[i]
        a = np.asarray(a, order="C")  # keeps 0-d scalars 0-d
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {
            "dtype": ST_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [off, off + len(raw)],
        }
        blobs.append(raw)
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for raw in blobs:
            f.write(raw)
    # Read it back with the official reader.
    back = np_load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v, equal_nan=True), (path, k)


def dec(v: float) -> str:
    """Plain positional decimal, shortest round-trip digits."""
    return np.format_float_positional(v, trim="-")


@dataclasses.dataclass
class Case:
    name: str
    shape: tuple  # logical shape, channels-first (N, C, ...)
    layout: str = "NCHW"
    dtype: str = "f32"
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track: bool = True
    nbt: int = 0
    x_kind: str = "normal"
    expect_error: bool = False
    salt: int = 0  # added to the seed; see f16_large_mean


def cases() -> list[Case]:
    V = (4, 4, 5, 6)  # shape for the semantic variants
    return [
        # ---- NCHW f32 --------------------------------------------------
        Case("bn1d_2d", (16, 5)),
        Case("bn1d_3d", (4, 3, 10)),
        Case("bn2d", (4, 6, 7, 9)),
        Case("bn3d", (2, 3, 4, 5, 6)),
        Case("c1", (8, 1, 5, 5)),
        Case("n1_spatial", (1, 4, 3, 5)),
        Case("m2", (2, 3)),
        Case("m2_3d", (1, 3, 2)),
        Case("wide_channels", (16, 512)),
        # 60000 elements: without tracking to keep the folder small
        Case("large_channel", (2, 3, 100, 100), track=False),
        Case("affine_off", V, affine=False),
        Case("no_tracking", V, track=False),
        Case("momentum_none", V, momentum=None, nbt=7),
        Case("keras_eps", V, eps=1e-3, momentum=0.01),
        Case("large_mean", (4, 6, 7, 9), x_kind="large_mean"),
        Case("tiny_variance", (4, 6, 7, 9), x_kind="tiny_variance"),
        Case("constant_channel", V, x_kind="constant_channel"),
        Case("nan_channel", V, x_kind="nan_channel"),
        Case("error_m1", (1, 4), expect_error=True),
        Case("error_m1_spatial", (1, 3, 1, 1), expect_error=True),
        # ---- NHWC f32 --------------------------------------------------
        Case("nhwc_3d", (4, 3, 10), layout="NHWC"),
        Case("nhwc_2d", (4, 6, 7, 9), layout="NHWC"),
        Case("nhwc_3d_vol", (2, 3, 4, 5, 6), layout="NHWC"),
        Case("nhwc_large_mean", (4, 6, 7, 9), layout="NHWC", x_kind="large_mean"),
        Case("nhwc_affine_off", (4, 3, 10), layout="NHWC", affine=False),
        Case("nhwc_no_tracking", (2, 3, 4, 5, 6), layout="NHWC", track=False),
        Case("nhwc_momentum_none", (4, 6, 7, 9), layout="NHWC", momentum=None, nbt=7),
        # ---- f16 storage -----------------------------------------------
        Case("f16_bn2d", (4, 6, 7, 9), dtype="f16"),
        Case("f16_bn1d", (32, 8), dtype="f16"),
        # With mean ~300 a float32 mean carries up to ulp(300)/2 = 1.5e-5 of
        # rounding error, which shifts dweight by that times |dbias|*invstd.
        # With the unsalted seed one channel (dweight 1.9, dbias -28.7) ends up
        # 3.2e-4 off in PyTorch's own float32 kernel, beyond FIXTURES.md's
        # 1e-4 + 1e-4*|want|; salt 1 is the first seed that float32 passes.
        Case("f16_large_mean", (4, 6, 7, 9), dtype="f16", x_kind="large_mean", salt=1),
        Case("f16_nhwc_2d", (4, 6, 7, 9), layout="NHWC", dtype="f16"),
        Case("f16_no_tracking", V, dtype="f16", track=False),
        Case("f16_affine_off", V, dtype="f16", affine=False),
    ]


def bn_class(ndim: int):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def np_dtype(d: str):
    return {"f32": np.float32, "f16": np.float16}[d]


def to_storage_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """Channels-first array -> stored layout (channel last for NHWC), contiguous."""
    if layout == "NHWC" and a.ndim >= 3:
        a = np.moveaxis(a, 1, -1)
    return np.ascontiguousarray(a)


def from_storage_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC" and t.ndim >= 3:
        t = t.movedim(-1, 1)
    return t.contiguous()


def make_x(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Float64 x in channels-first logical shape."""
    shape = case.shape
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    z = rng.standard_normal(shape)
    if case.x_kind == "large_mean":
        return 300.0 + z
    if case.x_kind == "tiny_variance":
        return 1.0 + 1e-3 * z
    mu = rng.normal(0.0, 1.0, C).reshape(bshape)
    sigma = rng.uniform(0.5, 2.0, C).reshape(bshape)
    x = mu + sigma * z
    if case.x_kind == "constant_channel":
        x[:, 1] = 2.5
    elif case.x_kind == "nan_channel":
        idx = (min(1, shape[0] - 1), 1) + tuple(min(2, s - 1) for s in shape[2:])
        x[idx] = np.nan
    return x


def make_params(C: int, rng: np.random.Generator):
    w = rng.uniform(0.5, 1.5, C)
    w[2::3] *= -1.0  # every third channel negative
    b = rng.normal(0.0, 0.5, C)
    rm = rng.normal(0.0, 0.5, C)
    rv = rng.uniform(0.5, 2.0, C)
    f = lambda a: a.astype(np.float32)
    return f(w), f(b), f(rm), f(rv)


def new_module(case: Case, C: int, w, b, rm, rv):
    m = bn_class(len(case.shape))(
        C,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track,
        dtype=torch.float64,
    )
    with torch.no_grad():
        if case.affine:
            m.weight.copy_(torch.from_numpy(w.astype(np.float64)))
            m.bias.copy_(torch.from_numpy(b.astype(np.float64)))
        if case.track:
            m.running_mean.copy_(torch.from_numpy(rm.astype(np.float64)))
            m.running_var.copy_(torch.from_numpy(rv.astype(np.float64)))
            m.num_batches_tracked.fill_(case.nbt)
    return m


def run_module(m, x64: torch.Tensor, dy64: torch.Tensor):
    x = x64.clone().requires_grad_(True)
    y = m(x)
    y.backward(dy64)
    dw = m.weight.grad.detach().clone() if m.affine else None
    db = m.bias.grad.detach().clone() if m.affine else None
    return y.detach(), x.grad.detach(), dw, db


def build_case(case: Case) -> tuple[dict, dict]:
    rng = np.random.default_rng(zlib.crc32(case.name.encode()) + case.salt)
    C = case.shape[1]
    sdt = np_dtype(case.dtype)
    red = tuple(d for d in range(len(case.shape)) if d != 1)
    M = int(np.prod([case.shape[d] for d in red]))

    # Inputs, rounded to the storage dtype first (logical channels-first).
    x_st = make_x(case, rng).astype(sdt)
    dy_st = rng.standard_normal(case.shape).astype(sdt)
    w, b, rm, rv = make_params(C, rng)

    t = {
        "x": to_storage_layout(x_st, case.layout),
        "dy": to_storage_layout(dy_st, case.layout),
    }
    if case.affine:
        t["weight"], t["bias"] = w, b
    if case.track:
        t["running_mean"], t["running_var"] = rm, rv

    # Recover the channels-first float64 view from what is stored.
    x64 = from_storage_layout(torch.from_numpy(t["x"]).double(), case.layout)
    dy64 = from_storage_layout(torch.from_numpy(t["dy"]).double(), case.layout)
    assert torch.equal(x64, torch.from_numpy(x_st).double()) or case.x_kind == "nan_channel"

    def out_st(y: torch.Tensor) -> np.ndarray:
        a = y.contiguous().numpy().astype(sdt)
        return to_storage_layout(a, case.layout)

    f32 = lambda y: y.numpy().astype(np.float32)

    if case.expect_error:
        m = new_module(case, C, w, b, rm, rv).train()
        try:
            m(x64.clone().requires_grad_(True))
        except ValueError as e:
            assert "more than 1 value per channel" in str(e), e
        else:
            raise AssertionError(f"{case.name}: torch did not refuse the training call")
        assert M == 1
    else:
        m = new_module(case, C, w, b, rm, rv).train()
        y, dx, dw, db = run_module(m, x64, dy64)
        mean = x64.mean(dim=red)
        var_b = x64.var(dim=red, unbiased=False)
        invstd = 1.0 / torch.sqrt(var_b + case.eps)

        # Self-checks against the DESIGN.md formulas.
        bsh = (1, C) + (1,) * (len(case.shape) - 2)
        wt = torch.from_numpy(w).double() if case.affine else torch.ones(C, dtype=torch.float64)
        bt = torch.from_numpy(b).double() if case.affine else torch.zeros(C, dtype=torch.float64)
        xc = x64 - mean.view(bsh)
        y_ref = xc * invstd.view(bsh) * wt.view(bsh) + bt.view(bsh)
        S1 = dy64.sum(dim=red)
        S2 = (dy64 * xc).sum(dim=red)
        dx_ref = (wt * invstd).view(bsh) * (
            dy64 - (S1 / M).view(bsh) - xc * (invstd**2 * S2 / M).view(bsh)
        )
        assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-9, equal_nan=True), case.name
        assert torch.allclose(dx, dx_ref, rtol=1e-8, atol=1e-8, equal_nan=True), case.name
        if case.affine:
            assert torch.allclose(db, S1, rtol=1e-9, atol=1e-9, equal_nan=True)
            assert torch.allclose(dw, S2 * invstd, rtol=1e-9, atol=1e-9, equal_nan=True)

        t["y"] = out_st(y)
        t["dx"] = out_st(dx)
        t["save_mean"] = f32(mean)
        t["save_invstd"] = f32(invstd)
        if case.affine:
            t["dweight"], t["dbias"] = f32(dw), f32(db)
        if case.track:
            assert int(m.num_batches_tracked) == case.nbt + 1
            mom = case.momentum if case.momentum is not None else 1.0 / (case.nbt + 1)
            rm_ref = (1 - mom) * torch.from_numpy(rm).double() + mom * mean
            rv_ref = (1 - mom) * torch.from_numpy(rv).double() + mom * var_b * M / (M - 1)
            assert torch.allclose(m.running_mean, rm_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
            assert torch.allclose(m.running_var, rv_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
            t["running_mean_out"] = f32(m.running_mean.detach())
            t["running_var_out"] = f32(m.running_var.detach())

    if case.track:
        me = new_module(case, C, w, b, rm, rv).eval()
        ye, dxe, dwe, dbe = run_module(me, x64, dy64)
        assert int(me.num_batches_tracked) == case.nbt
        t["y_eval"] = out_st(ye)
        t["dx_eval"] = out_st(dxe)
        if case.affine:
            t["dweight_eval"], t["dbias_eval"] = f32(dwe), f32(dbe)

    meta = {
        "format": FORMAT,
        "layout": case.layout,
        "eps": dec(case.eps),
        "momentum": "none" if case.momentum is None else dec(case.momentum),
        "affine": "true" if case.affine else "false",
        "track_running_stats": "true" if case.track else "false",
        "num_batches_tracked": str(case.nbt if case.track else 0),
        "dtype": case.dtype,
        "source": SOURCE,
        "case": case.name,
    }
    if case.track:
        meta["num_batches_tracked_out"] = str(case.nbt if case.expect_error else case.nbt + 1)
    if case.expect_error:
        meta["expect"] = "error"
    t = {k: np.ascontiguousarray(v) for k, v in t.items()}
    return t, meta


def torch_f32_check(case: Case, t: dict) -> list[str]:
    """Run PyTorch's own float32 CPU kernel on the stored inputs and return
    the expected tensors it misses by more than the FIXTURES.md tolerance.
    A fixture that PyTorch's float32 fails would be an unfair test."""
    sdt = np_dtype(case.dtype)
    C = case.shape[1]
    x = from_storage_layout(torch.from_numpy(t["x"].astype(np.float32)), case.layout)
    dy = from_storage_layout(torch.from_numpy(t["dy"].astype(np.float32)), case.layout)
    w, b = t.get("weight"), t.get("bias")
    rm, rv = t.get("running_mean"), t.get("running_var")

    def mod():
        m = bn_class(len(case.shape))(C, eps=case.eps, momentum=case.momentum,
                                       affine=case.affine, track_running_stats=case.track)
        with torch.no_grad():
            if case.affine:
                m.weight.copy_(torch.from_numpy(w))
                m.bias.copy_(torch.from_numpy(b))
            if case.track:
                m.running_mean.copy_(torch.from_numpy(rm))
                m.running_var.copy_(torch.from_numpy(rv))
                m.num_batches_tracked.fill_(case.nbt)
        return m

    got = {}
    if not case.expect_error:
        m = mod().train()
        y, dx, dw, db = run_module(m, x, dy)
        got.update(y=y, dx=dx, dweight=dw, dbias=db)
        if case.track:
            got.update(running_mean_out=m.running_mean, running_var_out=m.running_var)
    if case.track:
        y, dx, dw, db = run_module(mod().eval(), x, dy)
        got.update(y_eval=y, dx_eval=dx, dweight_eval=dw, dbias_eval=db)
    bad = []
    for k, g in got.items():
        if g is None or k not in t:
            continue
        g = g.detach().contiguous().numpy()
        storage = k in ("y", "dx", "y_eval", "dx_eval")
        if storage:
            g = to_storage_layout(g.astype(sdt), case.layout)
        tol = 5e-3 if storage and case.dtype == "f16" else 1e-4
        want = t[k].astype(np.float64)
        g = g.astype(np.float64)
        nan_ok = np.array_equal(np.isnan(g), np.isnan(want))
        fin = ~np.isnan(want)
        err = np.abs(g[fin] - want[fin]) > tol + tol * np.abs(want[fin])
        if not nan_ok or err.any():
            bad.append(f"{k} ({int(err.sum())} elements, max abs err "
                       f"{np.abs(g[fin] - want[fin]).max():.3g})")
    return bad


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + idt)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_checkpoints() -> list[Path]:
    torch.manual_seed(1234)
    model = TinyResNet().double()
    with torch.no_grad():  # non-trivial starting affine parameters
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(5):
        xb = torch.randn(8, 3, 12, 12, dtype=torch.float64) * 1.5 + 0.3
        tb = torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(model(xb), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sd = model.state_dict()
    bn_prefixes = [n for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    state = {}
    for p in bn_prefixes:
        for k in ("weight", "bias", "running_mean", "running_var"):
            state[f"{p}.{k}"] = sd[f"{p}.{k}"].detach().to(torch.float32).contiguous()
        state[f"{p}.num_batches_tracked"] = sd[f"{p}.num_batches_tracked"].to(torch.int64).contiguous()
        assert int(state[f"{p}.num_batches_tracked"]) == 5

    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    ck = CHECKPOINTS / "resnet_bn.safetensors"
    save_safetensors(
        ck,
        {k: v.numpy() for k, v in state.items()},
        metadata={
            "format": "batchnorm-checkpoint/1",
            "source": f"{SOURCE}; TinyResNet BatchNorm2d state after 5 SGD steps, rounded to f32",
            "eps": dec(1e-5),
            "momentum": dec(0.1),
        },
    )

    # Eval check for one nested layer, from the f32 state as stored.
    prefix = "layer1.0.bn1"
    C = state[f"{prefix}.weight"].numel()
    bn = nn.BatchNorm2d(C, eps=1e-5, momentum=0.1, dtype=torch.float64)
    bn.load_state_dict(
        {k[len(prefix) + 1:]: v.double() if v.is_floating_point() else v
         for k, v in state.items() if k.startswith(prefix + ".")}
    )
    bn.eval()
    rng = np.random.default_rng(zlib.crc32(b"resnet_bn_eval"))
    x = (rng.standard_normal((2, C, 5, 5)) * 1.3 + 0.2).astype(np.float32)
    with torch.no_grad():
        y = bn(torch.from_numpy(x).double()).numpy().astype(np.float32)
    ev = CHECKPOINTS / "resnet_bn_eval.safetensors"
    save_safetensors(
        ev,
        {"x": x, f"y_{prefix}": y},
        metadata={
            "format": "batchnorm-checkpoint-eval/1",
            "prefix": prefix,
            "eps": dec(1e-5),
            "layout": "NCHW",
            "checkpoint": "resnet_bn.safetensors",
            "source": SOURCE,
        },
    )
    return [ck, ev]


def main() -> int:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    total = 0
    for case in cases():
        tensors, meta = build_case(case)
        bad = torch_f32_check(case, tensors)
        if bad:
            raise SystemExit(f"{case.name}: PyTorch float32 misses the tolerance: {bad}")
        path = FIXTURES / f"{case.name}.safetensors"
        save_safetensors(path, tensors, meta)
        size = path.stat().st_size
        total += size
        shape = "x".join(str(s) for s in tensors["x"].shape)
        print(f"{case.name:22s} {case.layout} {case.dtype} x={shape:14s} {size:9d} B  "
              f"[{', '.join(tensors)}]")
    print(f"fixtures total: {total} B")
    for p in make_checkpoints():
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generate the PyTorch fixtures for folding BatchNorm into the layer before it.

Run from anywhere (paths are relative to the repository root); it needs only
torch (no numpy, no safetensors package):

    /work/venv-torch/bin/python scripts/make_fold_fixtures.py

Every random draw comes from a generator seeded by the case name and all
ground truth is computed in float64 on the CPU, so reruns are byte-identical.
Files are written to tests/fixtures/fold/ (keys in scripts/README.md):

layers.safetensors (format `bnorm-fold-layers/1`)
-------------------------------------------------
One folding case per prefix `<case>.`: a layer's `weight` (and `bias`), a
BatchNorm's `bn.running_mean`, `bn.running_var` (and `bn.weight`,
`bn.bias` when affine), and the expected `fused.weight`, `fused.bias`.
Metadata `<case>.kind` (`conv`, `conv_transpose`, `linear`), `<case>.eps`,
`<case>.groups`; `cases` lists the cases. The expected tensors are
`torch.nn.utils.fusion.fuse_conv_bn_weights` (`transpose=True` for
transposed convolutions) or `fuse_linear_bn_weights` applied to float64
copies of the stored float32 inputs, rounded to float32. PyTorch's function
cannot fold a grouped transposed convolution (its reshape assumes groups 1),
so that case is computed here per group. Every case is checked: the folded
layer's float64 output equals the layer + BatchNorm's within 1e-4, and
PyTorch's own float32 fusion is within a few float32 ulps of the expected.

model.safetensors (a PyTorch `state_dict`)
------------------------------------------
`TinyNet().state_dict()` after its BatchNorm statistics are set (below), as
`safetensors.torch.save_file` writes it: every parameter F32, every
`num_batches_tracked` I64 (). What `bnorm fold` reads.

model_check.safetensors (format `bnorm-fold-model/1`)
-----------------------------------------------------
`x` (2, 3, 6, 6) input, `y` PyTorch's float64 eval output of the unfolded
model (rounded to F32), `y_folded` the float64 output of the model rebuilt
with PyTorch's fused weights (rounded to F32) and the BatchNorms removed, and
`fused.<layer>.weight`, `fused.<layer>.bias` for each folded layer.
Metadata: `pairs` (`layer=batchnorm` comma-separated, as `--pair` takes
them), `transposed` (the transposed convolutions, comma-separated), `eps`.
"""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "fold"
SOURCE = f"torch {torch.__version__.split('+')[0]} float64"
EPS_DEFAULT = 1e-5

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.float64: "F64"}


def gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def save_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """Deterministic safetensors writer (same layout as make_fixtures.py's).

    `__metadata__` first (keys sorted), then the tensors by item size
    (largest first), then in the order given; the header is space-padded to
    a multiple of 8 bytes; little-endian, C-contiguous data. Read back and
    compared before returning.
    """
    items = list(tensors.items())
    order = sorted(range(len(items)), key=lambda i: (-items[i][1].element_size(), i))
    header = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs, off = [], 0
    for i in order:
        name, t = items[i]
        raw = bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).tolist())
        header[name] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [off, off + len(raw)],
        }
        blobs.append(raw)
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    hb += b" " * (-len(hb) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for raw in blobs:
            f.write(raw)
    back = load_safetensors(path)
    assert set(back) == set(tensors), path
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, (path, k)
        same = torch.equal(back[k], v) or (v.is_floating_point() and torch.allclose(back[k], v, rtol=0, atol=0, equal_nan=True))
        assert same, (path, k)


def load_safetensors(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    dtypes = {v: k for k, v in ST_DTYPES.items()}
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        raw = torch.tensor(list(body[a:b]), dtype=torch.uint8)
        out[name] = raw.view(dtypes[h["dtype"]]).reshape(h["shape"])
    return out


def decimal(x: float) -> str:
    """Plain positional decimal, as make_fixtures.py writes eps."""
    return format(x, "f").rstrip("0").rstrip(".") if x < 1e-3 else repr(x)


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    """Running statistics and affine parameters away from their defaults."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.num_batches_tracked.fill_(3)


def randomize_params(m: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def fuse_grouped_transpose(w, b, rm, rv, eps, bw, bb, groups):
    """Folding into a transposed convolution with groups: weight (in, out/groups, k...),
    output channel of (i, j) = (i // (in/groups)) * (out/groups) + j."""
    cin, opg = w.shape[0], w.shape[1]
    scale = bw * torch.rsqrt(rv + eps)
    per_in = scale.reshape(groups, 1, opg).expand(groups, cin // groups, opg).reshape(cin, opg)
    fw = w * per_in.reshape(cin, opg, *([1] * (w.dim() - 2)))
    fb = (b - rm) * scale + bb
    return fw, fb


# ---------------------------------------------------------------- layer cases


def layer_cases():
    # name, layer factory, BatchNorm factory, kind, eps
    return [
        ("conv2d", lambda: nn.Conv2d(4, 6, 3), lambda e: nn.BatchNorm2d(6, eps=e), "conv", 1e-5),
        (
            "conv2d_nobias_affine_off",
            lambda: nn.Conv2d(3, 5, (3, 2), bias=False),
            lambda e: nn.BatchNorm2d(5, eps=e, affine=False),
            "conv",
            1e-3,
        ),
        ("conv1d_groups", lambda: nn.Conv1d(4, 6, 3, groups=2), lambda e: nn.BatchNorm1d(6, eps=e), "conv", 1e-5),
        ("conv3d", lambda: nn.Conv3d(2, 3, 2), lambda e: nn.BatchNorm3d(3, eps=e), "conv", 1e-4),
        ("conv_transpose2d", lambda: nn.ConvTranspose2d(4, 6, 3), lambda e: nn.BatchNorm2d(6, eps=e), "conv_transpose", 1e-5),
        (
            "conv_transpose1d_nobias",
            lambda: nn.ConvTranspose1d(3, 5, 2, bias=False),
            lambda e: nn.BatchNorm1d(5, eps=e),
            "conv_transpose",
            1e-5,
        ),
        (
            "conv_transpose2d_groups2",
            lambda: nn.ConvTranspose2d(4, 6, 2, groups=2),
            lambda e: nn.BatchNorm2d(6, eps=e),
            "conv_transpose",
            1e-5,
        ),
        ("linear", lambda: nn.Linear(7, 5), lambda e: nn.BatchNorm1d(5, eps=e), "linear", 1e-5),
        (
            "linear_nobias_affine_off",
            lambda: nn.Linear(4, 3, bias=False),
            lambda e: nn.BatchNorm1d(3, eps=e, affine=False),
            "linear",
            1e-5,
        ),
    ]


def expected_fusion(layer, bn, kind):
    """PyTorch's fusion of float64 copies of the stored float32 tensors."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    c = bn.num_features
    bw = d(bn.weight) if bn.affine else torch.ones(c, dtype=torch.float64)
    bb = d(bn.bias) if bn.affine else torch.zeros(c, dtype=torch.float64)
    w, b = d(layer.weight), d(layer.bias)
    rm, rv = d(bn.running_mean), d(bn.running_var)
    groups = getattr(layer, "groups", 1)
    if kind == "linear":
        fw, fb = fuse_linear_bn_weights(w, b, rm, rv, bn.eps, bw, bb)
    elif kind == "conv_transpose" and groups > 1:
        fw, fb = fuse_grouped_transpose(w, b if b is not None else torch.zeros(c, dtype=torch.float64), rm, rv, bn.eps, bw, bb, groups)
    else:
        fw, fb = fuse_conv_bn_weights(w, b, rm, rv, bn.eps, bw, bb, transpose=kind == "conv_transpose")
    return fw.detach().float(), fb.detach().float()


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in float32 ulps of b."""
    spacing = torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()
    return float(((a - b).abs() / spacing).max())


def make_layers() -> None:
    tensors, meta, names = {}, {"format": "bnorm-fold-layers/1", "source": SOURCE}, []
    for name, make_layer, make_bn, kind, eps in layer_cases():
        g = gen(name)
        layer, bn = make_layer(), make_bn(eps)
        randomize_params(layer, g)
        randomize_bn(bn, g)
        bn.eval()
        fw, fb = expected_fusion(layer, bn, kind)

        # The folded layer computes what the layer + BatchNorm compute (float64).
        in_ch = layer.in_features if kind == "linear" else layer.in_channels
        spatial = {"linear": 0}.get(kind, layer.weight.dim() - 2)
        x = torch.randn((2, in_ch) + (4,) * spatial, generator=g, dtype=torch.float64)
        ref = copy.deepcopy(bn).double()(copy.deepcopy(layer).double()(x))
        folded = copy.deepcopy(layer).double()
        with torch.no_grad():
            folded.weight.copy_(fw.double())
            if folded.bias is None:
                folded.bias = nn.Parameter(torch.zeros(bn.num_features, dtype=torch.float64))
            folded.bias.copy_(fb.double())
        got = folded(x)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (name, (got - ref).abs().max())

        # PyTorch's own float32 fusion is a few ulps away at most.
        if not (kind == "conv_transpose" and getattr(layer, "groups", 1) > 1):
            if kind == "linear":
                w32, b32 = fuse_linear_bn_weights(
                    layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                    bn.weight if bn.affine else torch.ones(bn.num_features),
                    bn.bias if bn.affine else torch.zeros(bn.num_features),
                )
            else:
                w32, b32 = fuse_conv_bn_weights(
                    layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                    bn.weight, bn.bias, transpose=kind == "conv_transpose",
                )
            assert ulps(w32.detach(), fw) <= 2 and torch.allclose(b32.detach(), fb, atol=1e-6, rtol=1e-6), name

        p = f"{name}."
        tensors[p + "weight"] = layer.weight.detach().clone()
        if layer.bias is not None:
            tensors[p + "bias"] = layer.bias.detach().clone()
        if bn.affine:
            tensors[p + "bn.weight"] = bn.weight.detach().clone()
            tensors[p + "bn.bias"] = bn.bias.detach().clone()
        tensors[p + "bn.running_mean"] = bn.running_mean.clone()
        tensors[p + "bn.running_var"] = bn.running_var.clone()
        tensors[p + "fused.weight"] = fw
        tensors[p + "fused.bias"] = fb
        meta[p + "kind"] = kind
        meta[p + "eps"] = decimal(eps)
        meta[p + "groups"] = str(getattr(layer, "groups", 1))
        names.append(name)
    meta["cases"] = ",".join(names)
    save_safetensors(OUT / "layers.safetensors", tensors, meta)
    print(f"wrote {OUT / 'layers.safetensors'}: {len(names)} cases")


# ---------------------------------------------------------------- the model


class Block(nn.Module):
    """torchvision's BasicBlock names (conv1/bn1, conv2/bn2, downsample.0/1);
    conv2 is grouped."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TinyNet(nn.Module):
    """x (N, 3, 6, 6) -> stem conv1/bn1 (4) -> layer1.0 (4) -> layer1.1 (6, stride 2, downsample)
    -> up: ConvTranspose2d(6, 4, 2, stride 2) + up_norm (BatchNorm2d without affine, paired
    by --pair) -> head: Flatten, Linear(144, 5), BatchNorm1d(5) (head.1 + head.2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(Block(4, 4, 1), Block(4, 6, 2))
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.up_norm = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = F.relu(self.up_norm(self.up(x)))
        return self.head(x)


# (layer, BatchNorm, kind): every fold in TinyNet.
MODEL_PAIRS = [
    ("conv1", "bn1", "conv"),
    ("layer1.0.conv1", "layer1.0.bn1", "conv"),
    ("layer1.0.conv2", "layer1.0.bn2", "conv"),
    ("layer1.1.conv1", "layer1.1.bn1", "conv"),
    ("layer1.1.conv2", "layer1.1.bn2", "conv"),
    ("layer1.1.downsample.0", "layer1.1.downsample.1", "conv"),
    ("up", "up_norm", "conv_transpose"),
    ("head.1", "head.2", "linear"),
]


def make_model() -> None:
    g = gen("tiny_model")
    model = TinyNet()
    randomize_params(model, g)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m, g)
    with torch.no_grad():
        model.up_norm.running_var[0] = 0.0  # a dead channel: scale 1/sqrt(eps)
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_safetensors(OUT / "model.safetensors", state, {"format": "pt"})

    x = torch.randn(2, 3, 6, 6, generator=g)
    ref = TinyNet().double().eval()
    ref.load_state_dict({k: (v.double() if v.is_floating_point() else v) for k, v in state.items()})
    y = ref(x.double())

    folded = TinyNet().double().eval()
    folded.load_state_dict({k: (v.double() if v.is_floating_point() else v) for k, v in state.items()})
    modules = dict(folded.named_modules())
    check = {"x": x, "y": y.float()}
    for layer_name, bn_name, kind in MODEL_PAIRS:
        layer, bn = modules[layer_name], modules[bn_name]
        fw, fb = expected_fusion(layer, bn, kind)
        with torch.no_grad():
            layer.weight.copy_(fw.double())
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(bn.num_features, dtype=torch.float64))
            layer.bias.copy_(fb.double())
        parent, _, leaf = bn_name.rpartition(".")
        setattr(modules[parent] if parent else folded, leaf, nn.Identity())
        check[f"fused.{layer_name}.weight"] = fw
        check[f"fused.{layer_name}.bias"] = fb
    y_folded = folded(x.double())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert torch.allclose(y_folded, y, atol=1e-4, rtol=1e-4), (y_folded - y).abs().max()
    check["y_folded"] = y_folded.float()
    meta = {
        "format": "bnorm-fold-model/1",
        "source": SOURCE,
        "eps": decimal(EPS_DEFAULT),
        "pairs": ",".join(f"{a}={b}" for a, b, _ in MODEL_PAIRS),
        "transposed": ",".join(a for a, _, k in MODEL_PAIRS if k == "conv_transpose"),
    }
    save_safetensors(OUT / "model_check.safetensors", check, meta)
    print(f"|y| max {y.abs().max():.3e}")
    print(f"wrote {OUT / 'model.safetensors'} ({len(state)} keys) and model_check.safetensors; "
          f"max |y_folded - y| = {(y_folded - y).abs().max():.2e}")


if __name__ == "__main__":
    make_layers()
    make_model()

#!/usr/bin/env python3
"""Check fixture files against FIXTURES.md with an independent float32 NumPy
implementation (no torch): structure (metadata keys, tensor names, dtypes,
shapes) and values within the documented tolerance. Fused fixtures (keys
`activation`, `residual`; see scripts/README.md) are checked as
`act(bn(x) + z)`, their backward gated by the stored `y`, as the Rust runner
does.

    python scripts/check_fixtures.py [tests/fixtures/*.safetensors tests/fixtures/fused/*.safetensors]

The float32 implementation is deliberately the kind FIXTURES.md says must
pass (shifted two-pass variance, float32 accumulation, NumPy's pairwise sums);
with --naive it uses E[x^2]-E[x]^2 instead, which should fail the large-mean
cases. Exit status 1 when anything failed.
"""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_META = {"format", "layout", "eps", "momentum", "affine", "track_running_stats",
                 "num_batches_tracked", "dtype", "source", "case"}


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def close(got, want, tol):
    got = got.astype(np.float64)
    want = want.astype(np.float64)
    if got.shape != want.shape:
        return False, float("inf")
    nan_ok = np.array_equal(np.isnan(got), np.isnan(want))
    m = ~np.isnan(want)
    err = np.abs(got[m] - want[m]) - (tol + tol * np.abs(want[m]))
    worst = float(np.max(np.abs(got[m] - want[m]))) if m.any() else 0.0
    return bool(nan_ok and (err <= 0).all()), worst


def check(path, naive=False):
    h = header(path)
    meta = h.pop("__metadata__")
    t = load_file(path)
    problems = []
    missing = REQUIRED_META - set(meta)
    if missing:
        problems.append(f"missing metadata {sorted(missing)}")
    if meta["format"] != "batchnorm-fixture/1":
        problems.append("format")
    sdt = {"f32": np.float32, "f16": np.float16}[meta["dtype"]]
    affine = meta["affine"] == "true"
    track = meta["track_running_stats"] == "true"
    error = meta.get("expect") == "error"
    eps = float(meta["eps"])
    mom = None if meta["momentum"] == "none" else float(meta["momentum"])
    nbt = int(meta["num_batches_tracked"])
    if track and "num_batches_tracked_out" not in meta:
        problems.append("num_batches_tracked_out missing")
    fused = "activation" in meta or "residual" in meta
    relu = meta.get("activation", "identity") == "relu"
    residual = meta.get("residual", "false") == "true"

    x = t["x"]
    nhwc = meta["layout"] == "NHWC" and x.ndim >= 3
    cax = x.ndim - 1 if nhwc else 1
    C = x.shape[cax]
    red = tuple(d for d in range(x.ndim) if d != cax)
    M = int(np.prod([x.shape[d] for d in red]))
    bsh = [1] * x.ndim
    bsh[cax] = C

    expect = {"x", "dy"}
    if affine:
        expect |= {"weight", "bias"}
    if track:
        expect |= {"running_mean", "running_var", "y_eval", "dx_eval"}
        if affine:
            expect |= {"dweight_eval", "dbias_eval"}
    if not error:
        expect |= {"y", "dx", "save_mean", "save_invstd"}
        if affine:
            expect |= {"dweight", "dbias"}
        if track:
            expect |= {"running_mean_out", "running_var_out"}
    if residual:
        expect |= {"z"} | {k for k in ("dz", "dz_eval") if k.replace("dz", "dx") in expect}
    if set(t) != expect:
        problems.append(f"tensors {sorted(set(t) ^ expect)}")
    for k, v in t.items():
        storage = k in {"x", "dy", "y", "dx", "y_eval", "dx_eval", "z", "dz", "dz_eval"}
        if storage and (v.dtype != sdt or v.shape != x.shape):
            problems.append(f"{k}: {v.dtype} {v.shape}")
        if not storage and (v.dtype != np.float32 or v.shape != (C,)):
            problems.append(f"{k}: {v.dtype} {v.shape}")
    if error and M != 1:
        problems.append("error case with M != 1")

    f = np.float32
    xf = x.astype(f)
    z = t["z"].astype(f) if residual else f(0)

    def tail(v):
        """act(v + z): the fused epilogue (NaN kept by the ReLU)."""
        v = v + z
        return np.where(v < 0, f(0), v) if relu else v

    def gate(y, dy):
        """dy where the stored fused output y lets it through (zero where y <= 0)."""
        return np.where(y.astype(f) <= 0, f(0), dy) if relu else dy

    dy0 = t["dy"].astype(f)
    dy = gate(t["y"], dy0) if fused and "y" in t else dy0
    w = t["weight"] if affine else np.ones(C, f)
    b = t["bias"] if affine else np.zeros(C, f)
    got = {}
    if not error:
        if naive:
            mean = xf.mean(axis=red, dtype=f)
            var = np.maximum((xf * xf).mean(axis=red, dtype=f) - mean * mean, f(0))
        else:
            shift = xf[tuple(0 if d != cax else slice(None) for d in range(x.ndim))]
            xs = xf - shift.reshape(bsh)
            ms = xs.mean(axis=red, dtype=f)
            var = ((xs - ms.reshape(bsh)) ** 2).mean(axis=red, dtype=f)
            mean = shift + ms
        invstd = f(1) / np.sqrt(var + f(eps))
        xc = xf - mean.reshape(bsh)
        got["y"] = tail(xc * (invstd * w).reshape(bsh) + b.reshape(bsh))
        got["dz"] = dy
        s1 = dy.sum(axis=red, dtype=f)
        s2 = (dy * xc).sum(axis=red, dtype=f)
        got["dx"] = (w * invstd).reshape(bsh) * (
            dy - (s1 / M).reshape(bsh) - xc * (invstd * invstd * s2 / M).reshape(bsh))
        got["save_mean"], got["save_invstd"] = mean, invstd
        got["dweight"], got["dbias"] = s2 * invstd, s1
        if track:
            m = f(mom) if mom is not None else f(1.0 / (nbt + 1))
            got["running_mean_out"] = (1 - m) * t["running_mean"] + m * mean
            got["running_var_out"] = (1 - m) * t["running_var"] + m * var * f(M / (M - 1))
            if int(meta["num_batches_tracked_out"]) != nbt + 1:
                problems.append("num_batches_tracked_out")
    if track:
        scale = w / np.sqrt(t["running_var"] + f(eps))
        shift = b - t["running_mean"] * scale
        got["y_eval"] = tail(xf * scale.reshape(bsh) + shift.reshape(bsh))
        dy = gate(t["y_eval"], dy0) if fused else dy0
        got["dz_eval"] = dy
        got["dx_eval"] = dy * scale.reshape(bsh)
        xh = (xf - t["running_mean"].reshape(bsh)) / np.sqrt(t["running_var"] + f(eps)).reshape(bsh)
        got["dweight_eval"] = (dy * xh).sum(axis=red, dtype=f)
        got["dbias_eval"] = dy.sum(axis=red, dtype=f)
    worst = {}
    for k, g in got.items():
        if k not in t:
            continue
        if k in {"y", "dx", "y_eval", "dx_eval", "dz", "dz_eval"}:
            g = g.astype(sdt)  # what the backend would store
            tol = 5e-3 if sdt == np.float16 else 1e-4
        else:
            tol = 1e-4
        ok, err = close(g, t[k], tol)
        worst[k] = err
        if not ok:
            problems.append(f"{k} off (max abs err {err:.3g})")
    return problems, worst


def main(argv):
    naive = "--naive" in argv
    paths = [a for a in argv if not a.startswith("--")]
    if not paths:
        paths = sorted(glob.glob(str(ROOT / "tests" / "fixtures" / "*.safetensors")))
        paths += sorted(glob.glob(str(ROOT / "tests" / "fixtures" / "fused" / "*.safetensors")))
    failed = 0
    for p in paths:
        problems, worst = check(p, naive)
        w = max(worst.values()) if worst else 0.0
        status = "ok  " if not problems else "FAIL"
        failed += bool(problems)
        print(f"{status} {Path(p).stem:22s} worst abs err {w:.3g}  {'; '.join(problems)}")
    print(f"{len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

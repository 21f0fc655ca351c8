#!/usr/bin/env python3
"""Benchmark PyTorch's own BatchNorm (cuDNN / native CUDA kernels, or the CPU
kernels when there is no CUDA) as a baseline for wgpu-batchnorm's `bnorm bench`.

    /work/venv/bin/python scripts/torch_bench.py [--json FILE] [--repeat N]
    /work/venv/bin/python scripts/torch_bench.py --quick     # small smoke run

What is timed (one call each, median over --repeat runs after --warmup runs):
- `train_forward`: `F.batch_norm(x, running_mean, running_var, weight, bias,
  training=True, momentum=0.1, eps=1e-5)` under `torch.no_grad()` (batch
  statistics, running-stat update, normalized output).
- `eval_forward`: the same with `training=False` (running statistics).
- `backward`: `torch.autograd.grad(y, (x, weight, bias), dy,
  retain_graph=True)` on a graph built once by a training forward and kept:
  only the backward kernel (dx, dweight, dbias) plus autograd's dispatch
  overhead is timed, not a forward. (Not forward+backward minus forward.)
- `copy`: `y.copy_(x)` on a tensor of the same size and dtype, the bandwidth
  reference; each record carries `copy_gbps` and `fraction_of_copy`.

Parameters and running statistics are float32 also for f16 inputs (mixed
precision, as in AMP and in wgpu-batchnorm); when a backend refuses mixed
dtypes the parameters fall back to the input dtype (`params` in the record).
Timing: CUDA events around each call on CUDA; `time.perf_counter` on CPU.

GB/s use the ideal traffic per element: f32 train forward 12 B (read x twice,
write y), eval 8 B, backward 20 B (read x, dy twice, write dx), copy 8 B;
f16 half of each. Per-channel tensors are not counted.

--json FILE writes a JSON array of records:
  {"op", "backend" ("torch-cuda" | "torch-cpu"), "device" (name), "shape"
   ("32x64x112x112"), "layout" ("NCHW" | "NHWC"), "dtype" ("f32" | "f16"),
   "median_s", "gbps", "copy_gbps", "fraction_of_copy", "params", "repeat",
   "torch"}
NHWC means `torch.channels_last` (4-D shapes only); 2-D shapes are "NCHW".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
    (4096, 1024),  # BatchNorm1d
    (8, 64, 32, 32),
]
QUICK_SHAPES = [(8, 16, 16, 16), (256, 64), (4, 32, 8, 8)]
BYTES_PER_ELEM_F32 = {"train_forward": 12, "eval_forward": 8, "backward": 20, "copy": 8}
DTYPES = {"f32": torch.float32, "f16": torch.float16}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Timer:
    def __init__(self, dev: torch.device):
        self.dev = dev

    def time(self, fn, warmup: int, repeat: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeat):
            if self.dev.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def make_inputs(shape, layout, dtype, dev, gen, param_dtype):
    C = shape[1]
    x = torch.randn(shape, generator=gen, device="cpu").to(dev, dtype)
    dy = torch.randn(shape, generator=gen, device="cpu").to(dev, dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(C, generator=gen) + 0.5).to(dev, param_dtype)
    b = torch.randn(C, generator=gen).to(dev, param_dtype)
    rm = torch.zeros(C, device=dev, dtype=param_dtype)
    rv = torch.ones(C, device=dev, dtype=param_dtype)
    return x, dy, w, b, rm, rv


def bench_case(shape, layout, dtype_name, dev, timer, args, gen):
    """Returns {op: median_s} and the parameter dtype used."""
    dtype = DTYPES[dtype_name]
    for param_dtype in (torch.float32, dtype):
        x, dy, w, b, rm, rv = make_inputs(shape, layout, dtype, dev, gen, param_dtype)
        try:
            with torch.no_grad():
                F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
            break
        except RuntimeError:
            if param_dtype == dtype:
                raise
    res = {}

    def train():
        with torch.no_grad():
            F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    def evalf():
        with torch.no_grad():
            F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)

    res["train_forward"] = timer.time(train, args.warmup, args.repeat)
    res["eval_forward"] = timer.time(evalf, args.warmup, args.repeat)

    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True)
    y = F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
    res["backward"] = timer.time(
        lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True),
        args.warmup, args.repeat)
    del y
    return res, {torch.float32: "f32", torch.float16: "f16"}[param_dtype]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write the records as a JSON array")
    ap.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (median)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--dtype", choices=["f32", "f16", "all"], default="all")
    ap.add_argument("--quick", action="store_true",
                    help="a few small shapes and few repeats (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = min(args.repeat, 5)
        args.warmup = min(args.warmup, 2)
    shapes = QUICK_SHAPES if args.quick else SHAPES

    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    backend = f"torch-{dev.type}"
    name = device_name(dev)
    timer = Timer(dev)
    gen = torch.Generator().manual_seed(0)
    dtypes = ["f32", "f16"] if args.dtype == "all" else [args.dtype]

    print(f"# {backend} on {name}; torch {torch.__version__}; "
          f"{'cudnn ' + str(torch.backends.cudnn.version()) if dev.type == 'cuda' else str(torch.get_num_threads()) + ' threads'}; "
          f"median of {args.repeat} (warm-up {args.warmup})")
    hdr = (f"{'op':14s} {'shape':16s} {'layout':6s} {'dtype':5s} {'median':>11s} "
           f"{'GB/s':>9s} {'copy GB/s':>9s} {'of copy':>7s}")
    print(hdr)
    print("-" * len(hdr))
    records = []
    copy_cache = {}
    for shape in shapes:
        layouts = ["NCHW", "NHWC"] if len(shape) == 4 else ["NCHW"]
        n = 1
        for s in shape:
            n *= s
        for dtype_name in dtypes:
            scale = 0.5 if dtype_name == "f16" else 1.0
            key = (shape, dtype_name)
            if key not in copy_cache:
                src = torch.randn(shape, generator=gen).to(dev, DTYPES[dtype_name])
                dst = torch.empty_like(src)
                t = timer.time(lambda: dst.copy_(src), args.warmup, args.repeat)
                copy_cache[key] = n * BYTES_PER_ELEM_F32["copy"] * scale / t / 1e9
                del src, dst
            copy_gbps = copy_cache[key]
            for layout in layouts:
                try:
                    res, params = bench_case(shape, layout, dtype_name, dev, timer, args, gen)
                except RuntimeError as e:
                    print(f"# skipped {shape} {layout} {dtype_name}: {str(e).splitlines()[0]}")
                    continue
                for op, t in res.items():
                    gbps = n * BYTES_PER_ELEM_F32[op] * scale / t / 1e9
                    rec = {
                        "op": op,
                        "backend": backend,
                        "device": name,
                        "shape": "x".join(map(str, shape)),
                        "layout": layout,
                        "dtype": dtype_name,
                        "median_s": t,
                        "gbps": gbps,
                        "copy_gbps": copy_gbps,
                        "fraction_of_copy": gbps / copy_gbps,
                        "params": params,
                        "repeat": args.repeat,
                        "torch": torch.__version__,
                    }
                    records.append(rec)
                    print(f"{op:14s} {rec['shape']:16s} {layout:6s} {dtype_name:5s} "
                          f"{t * 1e6:9.1f}us {gbps:9.1f} {copy_gbps:9.1f} {gbps / copy_gbps:7.2f}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
        print(f"# wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

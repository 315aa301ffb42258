"""CPU benchmark: layernorm_ext's LayerNorm, RMSNorm and BatchNorm against
torch's own CPU ops, forward and forward+backward.

    python benchmarks/bench_cpu.py [--ops layer_norm,rms_norm,batch_norm]
                                   [--threads 1,all] [--no-output-cache]
                                   [--out benchmarks/results]

Ours, torch and a plain copy (``dst.copy_(src)`` moving the same number of
bytes) run side by side in one process, interleaved (the order alternates each
repetition) so that drift hits all three alike; the median of each is kept.
Reported per case: median times, the speedup over torch, the bandwidth of the
bytes the op must move (counted per op and pass below; each input read once,
each output written once) and that bandwidth as a percentage of the copy's.

Writes <out>/cpu.md (markdown table with machine, torch version, git commit,
date) and <out>/cpu.png (speedup and % of copy bandwidth per case).
Ours writes its large outputs into blocks reused from its CPU output cache
(layernorm_ext/cpu_cache.py); torch's come from its allocator, which for 32 MiB
and more maps fresh pages and faults every 4 KiB of them in. ``--no-output-cache``
turns the cache off, to see what the kernels alone gain.
Timings taken while other processes load the CPU are noisy: compare ratios
within one run and rerun on a quiet machine for numbers to publish.
"""

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import layernorm_ext  # noqa: E402
from layernorm_ext.op_db import op_info  # noqa: E402
from _report import cpu_description, git_commit  # noqa: E402

ROW_SHAPES = [(64, 768), (1024, 1024), (8192, 1024), (4096, 4096), (16384, 4096)]
ROW_DTYPES = [torch.float32, torch.bfloat16]
BATCH_NORM_SHAPES = [  # (shape, memory format)
    ((32, 64, 56, 56), torch.contiguous_format),
    ((32, 64, 56, 56), torch.channels_last),
    ((32, 256, 14, 14), torch.contiguous_format),
    ((32, 256, 14, 14), torch.channels_last),
    ((256, 1024), torch.contiguous_format),
]
STATS_BYTES = 4  # per-row / per-channel statistics are float32 here


@dataclass
class Case:
    op: str
    pass_: str  # "forward", "forward+backward" or "eval forward"
    dtype: torch.dtype
    shape: tuple
    layout: str
    ours: object  # zero-argument callables
    theirs: object
    bytes_moved: int
    threads: int = 0
    times: dict = field(default_factory=dict)


def _nbytes(shape, dtype):
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


def _forward_backward(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad)

    return run


def row_norm_cases(op, shapes, dtypes):
    """LayerNorm (vs F.layer_norm) or RMSNorm (vs F.rms_norm) over the last dim.

    A generator: each shape's tensors exist only while its cases run."""
    for rows, cols in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(rows, cols, generator=g).to(dtype)
            w = torch.randn(cols, generator=g).to(dtype)
            b = torch.randn(cols, generator=g).to(dtype) if op == "layer_norm" else None
            dy = torch.randn(rows, cols, generator=g).to(dtype)
            info = op_info(op)
            if op == "layer_norm":
                ours = lambda x, w, b, f=info.op: f(x, (x.shape[-1],), w, b)  # noqa: E731
                theirs = lambda x, w, b, f=info.ref: f(x, (x.shape[-1],), w, b)  # noqa: E731
            else:
                ours = lambda x, w, b, f=info.op: f(x, (x.shape[-1],), w)  # noqa: E731
                theirs = lambda x, w, b, f=info.ref: f(x, (x.shape[-1],), w)  # noqa: E731
            params = 2 if op == "layer_norm" else 1
            data = _nbytes((rows, cols), dtype)
            param = _nbytes((cols,), dtype)
            stats = rows * STATS_BYTES * (2 if op == "layer_norm" else 1)
            # forward: read x, params; write y, stats.
            forward = 2 * data + params * param + stats
            # backward: read dy, x, weight, stats; write dx, param grads.
            backward = 3 * data + param + stats + params * param
            yield Case(op, "forward", dtype, (rows, cols), "rows",
                       lambda o=ours: o(x, w, b), lambda t=theirs: t(x, w, b), forward)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            bg = b.clone().requires_grad_() if b is not None else None
            yield Case(op, "forward+backward", dtype, (rows, cols), "rows",
                       _forward_backward(ours, (xg, wg, bg), dy),
                       _forward_backward(theirs, (xg, wg, bg), dy), forward + backward)


def batch_norm_cases(dtypes):
    """BatchNorm training and eval (vs F.batch_norm), NCHW, channels-last and 1d
    (a generator, as row_norm_cases)."""
    info = op_info("batch_norm")
    ours_fn, torch_fn = info.op, info.ref
    for shape, memory_format in BATCH_NORM_SHAPES:
        layout = {torch.channels_last: "NHWC"}.get(memory_format, "NCHW" if len(shape) == 4 else "NC")
        channels = shape[1]
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
            dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
            w = torch.randn(channels, generator=g)
            b = torch.randn(channels, generator=g)
            stats = {name: (torch.zeros(channels), torch.ones(channels)) for name in ("ours", "torch")}

            def make(fn, name, training):
                running_mean, running_var = stats[name]
                return lambda x, w, b: fn(x, running_mean, running_var, w, b, training, 0.1, 1e-5)

            data = _nbytes(shape, dtype)
            params = 2 * channels * 4
            forward = 2 * data + params + 4 * channels * 4
            backward = 3 * data + params + 2 * channels * 4 + 2 * channels * 4
            ours_train, torch_train = make(ours_fn, "ours", True), make(torch_fn, "torch", True)
            ours_eval, torch_eval = make(ours_fn, "ours", False), make(torch_fn, "torch", False)
            yield Case("batch_norm", "train forward", dtype, shape, layout,
                       lambda: ours_train(x, w, b), lambda: torch_train(x, w, b), forward)
            xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            yield Case("batch_norm", "train forward+backward", dtype, shape, layout,
                       _forward_backward(ours_train, (xg, wg, bg), dy),
                       _forward_backward(torch_train, (xg, wg, bg), dy), forward + backward)
            yield Case("batch_norm", "eval forward", dtype, shape, layout,
                       lambda: ours_eval(x, w, b), lambda: torch_eval(x, w, b),
                       2 * data + params + 2 * channels * 4)


def copy_of(bytes_moved):
    """A copy that moves `bytes_moved` bytes: reads half of them, writes half."""
    src = torch.randint(0, 255, (max(bytes_moved // 2, 1),), dtype=torch.uint8)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure(case, budget_s):
    """Median seconds of ours, torch and copy, interleaved."""
    contenders = {"ours": case.ours, "torch": case.theirs, "copy": copy_of(case.bytes_moved)}
    for fn in contenders.values():  # warm up: first-call costs, allocator, caches
        fn()
    start = time.perf_counter()
    for fn in contenders.values():
        fn()
    per_round = time.perf_counter() - start
    reps = max(5, min(200, int(budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in samples.items()}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def label(case):
    shape = "x".join(map(str, case.shape))
    return f"{case.op} {case.pass_} {dtype_name(case.dtype)} {case.layout} {shape} t{case.threads}"


def write_markdown(cases, path, header):
    cases = sorted(cases, key=lambda c: c.threads)  # stable: one table section per count
    lines = [
        "# layernorm_ext CPU benchmark",
        "",
        *[f"- {key}: {value}" for key, value in header.items()],
        "",
        "Median times; speedup = torch / ours; GB/s of the bytes each op must move "
        "(inputs read once, outputs written once); % copy = that bandwidth against a "
        "`dst.copy_(src)` moving the same bytes in the same run. Our large outputs reuse blocks "
        "from layernorm_ext's CPU output cache (see the header line above); torch's come "
        "from its allocator, which maps fresh pages for 32 MiB and more.",
        "",
        "| op | pass | dtype | layout | shape | threads | ours ms | torch ms | speedup "
        "| ours GB/s | torch GB/s | ours % copy | torch % copy |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        t = c.times
        lines.append(
            f"| {c.op} | {c.pass_} | {dtype_name(c.dtype)} | {c.layout} | "
            f"{'x'.join(map(str, c.shape))} | {c.threads} | {t['ours'] * 1e3:.3f} | "
            f"{t['torch'] * 1e3:.3f} | {t['torch'] / t['ours']:.2f}x | "
            f"{c.bytes_moved / t['ours'] / 1e9:.1f} | {c.bytes_moved / t['torch'] / 1e9:.1f} | "
            f"{100 * t['copy'] / t['ours']:.0f}% | {100 * t['copy'] / t['torch']:.0f}% |"
        )
    lines += ["", "Geometric mean of speedups:", ""]
    groups = [(op, (op,)) for op in dict.fromkeys(c.op for c in cases)]
    groups.append(("layer_norm + rms_norm", ("layer_norm", "rms_norm")))
    groups.append(("all cases", tuple(dict.fromkeys(c.op for c in cases))))
    for name, ops in groups:
        for threads in dict.fromkeys(c.threads for c in cases):
            speedups = [c.times["torch"] / c.times["ours"] for c in cases
                        if c.op in ops and c.threads == threads]
            if speedups:
                geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
                lines.append(f"- {name}, {threads} thread(s): {geo:.2f}x over {len(speedups)} cases "
                             f"(min {min(speedups):.2f}x)")
    path.write_text("\n".join(lines) + "\n")


def write_plot(cases, path, header):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thread_counts = list(dict.fromkeys(c.threads for c in cases))
    fig, axes = plt.subplots(2, len(thread_counts), squeeze=False,
                             figsize=(max(10, 0.32 * len(cases) / len(thread_counts) + 4) * len(thread_counts), 11))
    for col, threads in enumerate(thread_counts):
        subset = [c for c in cases if c.threads == threads]
        labels = [label(c).rsplit(" t", 1)[0] for c in subset]
        xs = range(len(subset))
        speedup = axes[0][col]
        ratios = [c.times["torch"] / c.times["ours"] for c in subset]
        # Log scale: RMSNorm's 10-80x would flatten everything else; red marks a loss.
        speedup.bar(xs, ratios, color=["tab:red" if r < 1 else "tab:blue" for r in ratios])
        speedup.axhline(1.0, color="black", linewidth=0.8)
        speedup.set_yscale("log")
        speedup.set_ylabel("speedup over torch (x, log scale)")
        speedup.set_title(f"{threads} thread(s)")
        speedup.set_xticks(list(xs), [])
        share = axes[1][col]
        width = 0.4
        share.bar([x - width / 2 for x in xs], [100 * c.times["copy"] / c.times["ours"] for c in subset],
                  width, label="layernorm_ext")
        share.bar([x + width / 2 for x in xs], [100 * c.times["copy"] / c.times["torch"] for c in subset],
                  width, label="torch")
        share.set_ylabel("% of copy bandwidth")
        share.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        share.legend()
    fig.suptitle(f"layernorm_ext vs torch on CPU: {header['machine']}, torch {header['torch']}, "
                 f"{header['commit']}, {header['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="layer_norm,rms_norm,batch_norm",
                        help="comma-separated subset of layer_norm, rms_norm, batch_norm")
    parser.add_argument("--threads", default="1,all",
                        help="comma-separated thread counts; 'all' = every core")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="seconds of measurement per case (default 0.5)")
    parser.add_argument("--shapes", default=None,
                        help="LayerNorm/RMSNorm shapes as RxC,RxC (default: the standard set)")
    parser.add_argument("--no-output-cache", action="store_true",
                        help="allocate every output fresh, as torch does (sets the CPU output "
                             "cache's limit to 0)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.no_output_cache:
        layernorm_ext.set_cpu_cache_limit(0)

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = set(ops) - {"layer_norm", "rms_norm", "batch_norm"}
    if unknown:
        parser.error(f"unknown ops: {', '.join(sorted(unknown))}")
    threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    shapes = ROW_SHAPES if args.shapes is None else [
        tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]

    def cases():
        for op in ops:
            if op == "batch_norm":
                yield from batch_norm_cases([torch.float32])
            else:
                yield from row_norm_cases(op, shapes, ROW_DTYPES)

    header = {
        "machine": cpu_description(),
        "torch": torch.__version__,
        "layernorm_ext simd": layernorm_ext.build_info()["simd"],
        "layernorm_ext CPU output cache": (
            f"limit {layernorm_ext.cpu_cache_info()['limit_bytes'] >> 20} MiB"
            + (" (off: --no-output-cache)" if args.no_output_cache else "")
        ),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    results = []
    for case in cases():
        for count in dict.fromkeys(threads):
            torch.set_num_threads(count)
            timed = Case(**{**case.__dict__, "threads": count, "times": {}})
            timed.times = measure(case, args.budget)
            results.append(timed)
            t = timed.times
            print(f"{label(timed):70s} ours {t['ours'] * 1e3:8.3f} ms  torch {t['torch'] * 1e3:8.3f} ms  "
                  f"{t['torch'] / t['ours']:5.2f}x  {100 * t['copy'] / t['ours']:4.0f}% of copy",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(results, out / "cpu.md", header)
    write_plot(results, out / "cpu.png", header)
    print(f"wrote {out / 'cpu.md'} and {out / 'cpu.png'}")


if __name__ == "__main__":
    main()

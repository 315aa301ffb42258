"""GPU benchmark of layernorm_ext's CUDA kernels against torch's native ops,
the same ops under torch.compile, and Liger-Kernel's Triton kernels.

For LayerNorm and RMSNorm (rows 4096..32768, row length 512..16384) and
BatchNorm (common conv shapes, NCHW and channels-last), in float32 and
bfloat16, forward and forward+backward, it reports the median time, the
bandwidth of the bytes the op must move (each input read once, each output
written once) and that time as a percentage of a device-to-device copy of the
same number of bytes, timed in the same run. Writes
benchmarks/results/gpu_<device>.md (table, device, torch version, git commit,
date) and gpu_<device>.png (plot).

    python benchmarks/bench_gpu.py                 # full run on the current GPU
    python benchmarks/bench_gpu.py --quick         # a few shapes
    python benchmarks/bench_gpu.py --dry-run       # tiny CPU tensors: checks the
                                                   # harness, byte counts, table and plot
Timing: triton.testing.do_bench (median, CUDA events) when triton imports, else
CUDA events; warm-up first; inputs smaller than 3x the L2 cache rotate among
several buffers so that the cache does not serve them.
"""

import argparse
import datetime
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# The installed layernorm_ext (pip install --no-build-isolation .), not the
# source tree, which has no build of its own.
import layernorm_ext
from _report import git_commit
from layernorm_ext.op_db import op_info

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


# ------------------------------------------------------------ bytes to move


def row_norm_bytes(kind, rows, cols, dtype, backward):
    """Fewest bytes a row norm moves: x read and y written once, the affine
    parameters read, the statistics written (fp32); the backward adds x and dy
    read, dx written, statistics read, parameter gradients written."""
    elem = torch.finfo(dtype).bits // 8
    params = 2 if kind == "layer_norm" else 1
    stats = 2 if kind == "layer_norm" else 1
    forward = 2 * rows * cols * elem + params * cols * elem + stats * rows * 4
    if not backward:
        return forward
    return (
        forward + 3 * rows * cols * elem + stats * rows * 4 + 2 * params * cols * elem
    )


def batch_norm_bytes(shape, dtype, backward):
    """Fewest bytes a training BatchNorm moves: x read and y written once
    (statistics and parameters are [C], negligible but counted); the backward
    reads x and dy and writes dx."""
    elem = torch.finfo(dtype).bits // 8
    numel = math.prod(shape)
    channels = shape[1]
    forward = 2 * numel * elem + 6 * channels * 4
    if not backward:
        return forward
    return forward + 3 * numel * elem + 4 * channels * 4


# ------------------------------------------------------------------- timing


def l2_bytes(device):
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "L2_cache_size", 50 << 20)


def median_ms(fn, device, warmup_ms=25, rep_ms=100):
    if device.type != "cuda":
        for _ in range(2):
            fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except ImportError:
        pass
    fn()
    torch.cuda.synchronize(device)
    start, end = (
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    once = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / once))):
        fn()
    samples = []
    for _ in range(max(5, int(rep_ms / once))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def rotating(make, nbytes, device):
    """Several input sets when one would sit in L2; returns a next() callable."""
    copies = 1
    if device.type == "cuda" and nbytes < 3 * l2_bytes(device):
        copies = max(2, math.ceil(3 * l2_bytes(device) / max(nbytes, 1)))
        copies = min(copies, 64)
    sets = [make() for _ in range(copies)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % copies
        return sets[state["i"]]

    return next_set


def copy_ms(nbytes, device):
    """Time of a device-to-device copy that moves nbytes (half read, half written)."""
    n = max(1, nbytes // 2)

    def make():
        return torch.randint(
            0, 255, (n,), dtype=torch.uint8, device=device
        ), torch.empty(n, dtype=torch.uint8, device=device)

    next_pair = rotating(make, nbytes, device)

    def run():
        src, dst = next_pair()
        dst.copy_(src)

    return median_ms(run, device)


# ----------------------------------------------------------- implementations


def liger_modules():
    """Liger-Kernel's LayerNorm / RMSNorm modules, or the reason they are missing."""
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except Exception as error:  # noqa: BLE001 (any import failure means: not available)
        return None, f"liger_kernel not importable: {error.__class__.__name__}: {error}"
    return (LigerLayerNorm, LigerRMSNorm), None


def row_norm_impls(kind, cols, dtype, device, with_compile, liger):
    w = torch.randn(cols, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(cols, device=device, dtype=dtype, requires_grad=True)
    info = op_info(kind)
    if kind == "layer_norm":
        ours = lambda x: info.op(x, [cols], w, b)
        native = lambda x: info.ref(x, [cols], w, b)
    else:
        ours = lambda x: info.op(x, [cols], w, 1e-6)
        native = lambda x: info.ref(x, [cols], w, 1e-6)
    impls = {"layernorm_ext": ours, "torch": native}
    if with_compile:
        impls["torch.compile"] = torch.compile(native, dynamic=True)
    if liger is not None and device.type == "cuda":
        layer_cls, rms_cls = liger
        try:
            module = (
                layer_cls(cols, eps=1e-5)
                if kind == "layer_norm"
                else rms_cls(cols, eps=1e-6)
            )
            impls["liger"] = module.to(device=device, dtype=dtype)
        except Exception as error:  # noqa: BLE001
            print(f"liger {kind}: not usable ({error})", file=sys.stderr)
    return impls


def batch_norm_impls(channels, dtype, device, with_compile):
    param_dtype = torch.float32
    w = torch.randn(channels, device=device, dtype=param_dtype, requires_grad=True)
    b = torch.randn(channels, device=device, dtype=param_dtype, requires_grad=True)
    ops = torch.ops.layernorm_ext

    info = op_info("batch_norm")
    if hasattr(layernorm_ext, "batch_norm"):
        ours = lambda x: info.op(x, None, None, w, b, training=True)
    else:  # the op alone (no autograd formula): forward only
        ours = lambda x: ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)[0]

    native = lambda x: info.ref(x, None, None, w, b, training=True)
    impls = {"layernorm_ext": ours, "torch": native}
    if with_compile:
        impls["torch.compile"] = torch.compile(native, dynamic=True)
    return impls


# -------------------------------------------------------------------- cases


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    direction: str
    impl: str
    ms: float
    nbytes: int
    copy_ms: float
    note: str = ""

    @property
    def gbps(self):
        return self.nbytes / (self.ms * 1e-3) / 1e9 if self.ms > 0 else float("nan")

    @property
    def pct_copy(self):
        return 100.0 * self.copy_ms / self.ms if self.ms > 0 else float("nan")


@dataclass
class Config:
    row_shapes: list
    bn_shapes: list
    dtypes: list
    device: torch.device
    with_compile: bool
    notes: list = field(default_factory=list)


def time_case(impl, make_input, nbytes, backward, device):
    """Median ms of impl on rotating inputs; forward+backward when asked."""
    if backward:

        def make():
            x = make_input().requires_grad_()
            return x, torch.randn_like(x)

        next_set = rotating(make, nbytes, device)

        def run():
            x, dy = next_set()
            x.grad = None  # a fresh gradient each run, not an accumulation
            impl(x).backward(dy)

    else:
        next_set = rotating(make_input, nbytes, device)

        def run():
            with torch.no_grad():
                impl(next_set())

    return median_ms(run, device)


def timed_or_note(cfg, what, impl, make, nbytes, backward):
    """The median time, or None with a note in the report when the impl fails
    (one broken column must not cost the rest of the run)."""
    try:
        return time_case(impl, make, nbytes, backward, cfg.device)
    except (RuntimeError, NotImplementedError) as error:
        note = f"{what}{' fwd+bwd' if backward else ''}: failed ({str(error).splitlines()[0][:200]})"
        print(note, file=sys.stderr)
        cfg.notes.append(note)
        return None


def random_tensor(shape, dtype, device, memory_format):
    return torch.randn(shape, device=device, dtype=dtype).contiguous(
        memory_format=memory_format
    )


def time_impls(cfg, results, op, shape, dtype, impls, make, nbytes_of):
    """Times every impl forward and forward+backward against a copy of the
    same bytes, appending a Result per timing."""
    for backward in (False, True):
        nbytes = nbytes_of(backward)
        reference_ms = copy_ms(nbytes, cfg.device)
        direction = "fwd+bwd" if backward else "fwd"
        for name, impl in impls.items():
            ms = timed_or_note(
                cfg, f"{op} {shape} {name}", impl, make, nbytes, backward
            )
            if ms is None:
                continue
            results.append(
                Result(
                    op,
                    shape,
                    DTYPE_NAMES[dtype],
                    direction,
                    name,
                    ms,
                    nbytes,
                    reference_ms,
                )
            )
            print(format_row(results[-1]), flush=True)


def run_row_norms(cfg, liger, results):
    for kind in ("layer_norm", "rms_norm"):
        for dtype in cfg.dtypes:
            for rows, cols in cfg.row_shapes:
                impls = row_norm_impls(
                    kind, cols, dtype, cfg.device, cfg.with_compile, liger
                )
                make = functools.partial(
                    torch.randn, rows, cols, device=cfg.device, dtype=dtype
                )
                nbytes_of = functools.partial(row_norm_bytes, kind, rows, cols, dtype)
                time_impls(
                    cfg, results, kind, f"{rows}x{cols}", dtype, impls, make, nbytes_of
                )


def run_batch_norms(cfg, results):
    for dtype in cfg.dtypes:
        for shape in cfg.bn_shapes:
            for channels_last in (False, True):
                impls = batch_norm_impls(shape[1], dtype, cfg.device, cfg.with_compile)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                make = functools.partial(random_tensor, shape, dtype, cfg.device, fmt)
                label = (
                    f"{'x'.join(map(str, shape))} {'NHWC' if channels_last else 'NCHW'}"
                )
                nbytes_of = functools.partial(batch_norm_bytes, shape, dtype)
                time_impls(
                    cfg, results, "batch_norm", label, dtype, impls, make, nbytes_of
                )


# ------------------------------------------------------------------- report

HEADER = "| op | shape | dtype | pass | impl | median ms | GB/s | % of copy |"


def format_row(r):
    return (
        f"| {r.op} | {r.shape} | {r.dtype} | {r.direction} | {r.impl} | {r.ms:.4f} | "
        f"{r.gbps:.1f} | {r.pct_copy:.1f} |"
    )


def device_name(device):
    return (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    )


def markdown(results, cfg):
    lines = [
        f"# GPU benchmark: {device_name(cfg.device)}",
        "",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, layernorm_ext commit {git_commit()}",
        f"- date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        "- median time; GB/s of the bytes the op must move (inputs read once, outputs written once);",
        "  % of copy = time of a device-to-device copy of the same bytes / the op's time",
        *[f"- {note}" for note in cfg.notes],
        "",
        HEADER,
        "|---|---|---|---|---|---:|---:|---:|",
        *[format_row(r) for r in results],
        "",
    ]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r.op, r.dtype, r.direction) for r in results})
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(12, 3 * len(groups)), squeeze=False
    )
    for ax, (op, dtype, direction) in zip(axes[:, 0], groups):
        subset = [
            r for r in results if (r.op, r.dtype, r.direction) == (op, dtype, direction)
        ]
        shapes = list(dict.fromkeys(r.shape for r in subset))
        impls = list(dict.fromkeys(r.impl for r in subset))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            values = [
                next((r.pct_copy for r in subset if r.shape == s and r.impl == impl), 0)
                for s in shapes
            ]
            ax.bar(
                [i + k * width for i in range(len(shapes))], values, width, label=impl
            )
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(shapes))],
            shapes,
            rotation=30,
            fontsize=7,
        )
        ax.set_ylabel("% of copy")
        ax.set_title(f"{op} {dtype} {direction}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes on CPU tensors (no GPU needed)",
    )
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile column"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    if args.dry_run:
        cfg = Config(
            [(64, 32), (16, 512)],
            [(4, 8, 6, 6)],
            [torch.float32, torch.bfloat16],
            torch.device("cpu"),
            with_compile=False,
            notes=[
                "DRY RUN on CPU tensors: checks the harness only, the numbers mean nothing"
            ],
        )
    else:
        if not torch.cuda.is_available() or not layernorm_ext.build_info()["cuda"]:
            sys.exit(
                "bench_gpu: needs a CUDA GPU and layernorm_ext built with CUDA (or use --dry-run)"
            )
        rows = [4096, 32768] if args.quick else [4096, 8192, 16384, 32768]
        cols = [1024, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        bn = (
            [(64, 256, 56, 56), (128, 1024, 14, 14)]
            if args.quick
            else [
                (32, 64, 112, 112),
                (64, 256, 56, 56),
                (64, 512, 28, 28),
                (128, 1024, 14, 14),
                (256, 2048, 7, 7),
            ]
        )
        cfg = Config(
            [(r, c) for r in rows for c in cols],
            bn,
            [torch.float32, torch.bfloat16],
            torch.device("cuda"),
            with_compile=not args.no_compile,
        )
    liger, reason = liger_modules()
    if reason:
        cfg.notes.append(reason)

    results = []
    print(HEADER, flush=True)
    run_row_norms(cfg, liger, results)
    run_batch_norms(cfg, results)

    args.out.mkdir(parents=True, exist_ok=True)
    tag = (
        "dryrun"
        if args.dry_run
        else torch.cuda.get_device_name().replace(" ", "_").lower()
    )
    md_path = args.out / f"gpu_{tag}.md"
    md_path.write_text(markdown(results, cfg))
    png_path = args.out / f"gpu_{tag}.png"
    print(
        f"wrote {md_path}"
        + (
            f" and {png_path}"
            if plot(results, png_path)
            else " (matplotlib missing: no plot)"
        )
    )
    return results


if __name__ == "__main__":
    main()

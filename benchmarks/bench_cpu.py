"""CPU benchmark: layernorm_ext's LayerNorm, RMSNorm and BatchNorm against
torch eager and torch.compile (inductor), under glibc malloc and tcmalloc.

    python benchmarks/bench_cpu.py [--quick] [--ops layer_norm,rms_norm,batch_norm]
                                   [--threads 1,all] [--allocators glibc,tcmalloc]
                                   [--budget SECONDS] [--out benchmarks/results]
    python benchmarks/bench_cpu.py --from-json benchmarks/results/cpu.json

Each allocator gets a child process of this script, started alike (tcmalloc
and jemalloc through LD_PRELOAD; apt-get install libtcmalloc-minimal4
libjemalloc2); jemalloc runs with the MALLOC_CONF of PyTorch's CPU tuning
guide unless MALLOC_CONF is set, and glibc-thp is glibc with torch's
THP_MEM_ALLOC_ENABLE=1. Every output of ours and torch's comes from
the process's allocator, so the allocator decides for both sides whether a
large output is fresh memory (a page fault every 4 KiB) or reused.

In each child, per case and thread count: ours, torch eager (the
torch.nn.functional call), the same call under torch.compile (dynamic=False,
compiled and warmed up before timing, once per thread count: inductor bakes
the thread count into its code) and a copy (``dst.copy_(src)`` moving the
same bytes) run interleaved (the order alternates each repetition), and the
median of each is kept. Reported per case: times, ours vs eager and vs
inductor (their time / ours), minor page faults per call, and each one's
bandwidth of the bytes the op must move (each input read once, each output
written once) as a percentage of the copy's. Then geometric means per
allocator and thread count, and the cases that miss the project's targets.

Writes <out>/cpu.md (machine, commit, date, torch and allocator versions,
load average), <out>/cpu.png and the raw results <out>/cpu.json, from which
``--from-json`` writes the table and plot again without measuring.
``--quick`` runs fewer cases for a shorter time (development; it writes to a
directory under the system's temporary one unless --out is given).
Timings taken while other processes load the CPU are noisy: compare ratios
within one run, and publish numbers from a quiet machine.
"""

import argparse
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import layernorm_ext  # noqa: E402
from layernorm_ext.op_db import op_info  # noqa: E402
from _report import cpu_description, git_commit  # noqa: E402

# Below the 1 MiB L2 of the benchmark machine, well past it, and the largest
# one the issue measured (128 MiB in float32).
ROW_SHAPES = [(128, 1024), (4096, 2048), (8192, 4096)]
QUICK_ROW_SHAPES = [(128, 1024), (8192, 4096)]
BATCH_NORM_SHAPES = [(8, 32, 16, 16), (32, 64, 56, 56)]
QUICK_BATCH_NORM_SHAPES = [(32, 64, 56, 56)]
DTYPES = [torch.float32, torch.bfloat16]
QUICK_DTYPES = [torch.float32]
STATS_BYTES = 4  # per-row / per-channel statistics are float32 here

# name -> (library to preload, environment it runs with); glibc is the default.
ALLOCATORS = {
    "glibc": (None, {}),
    # torch's own option: its allocations of 2 MiB and more aligned to 2 MiB
    # and madvise'd for transparent huge pages (a fault per 2 MiB, not 4 KiB).
    "glibc-thp": (None, {"THP_MEM_ALLOC_ENABLE": "1"}),
    "tcmalloc": ("tcmalloc_minimal", {}),
    "jemalloc": ("jemalloc", {"MALLOC_CONF": "oversize_threshold:1,background_thread:true,"
                                             "metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
}

# The targets of the speed work (README "Speed (CPU)").
TARGET_GEOMEAN_TCMALLOC = 2.0
TARGET_MIN_TCMALLOC = 1.0
TARGET_MIN_GLIBC = 0.95
TARGET_COPY_SHARE = {"forward": 0.80, "forward+backward": 0.60}


@dataclass
class Case:
    op: str
    pass_: str  # "forward" or "forward+backward"
    dtype: str
    shape: tuple
    layout: str
    bytes_moved: int
    input_bytes: int  # of the input tensor alone, to tell cases past L2
    threads: int = 0
    allocator: str = ""
    times: dict = field(default_factory=dict)  # contender -> median seconds
    faults: dict = field(default_factory=dict)  # contender -> minor page faults per call


def _nbytes(shape, dtype):
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


def _forward_backward(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad)

    return run


def _compiled(fn):
    """fn under torch.compile, compiled afresh on its first call (see measure)."""
    return torch.compile(fn, dynamic=False)


def row_norm_cases(op, shapes, dtypes):
    """LayerNorm or RMSNorm over the last dim: yields (Case, {name: make-callable}).

    A generator: each shape's tensors exist only while its cases run."""
    info = op_info(op)
    for rows, cols in shapes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(rows, cols, generator=g).to(dtype)
            w = torch.randn(cols, generator=g).to(dtype)
            b = torch.randn(cols, generator=g).to(dtype) if op == "layer_norm" else None
            dy = torch.randn(rows, cols, generator=g).to(dtype)
            if op == "layer_norm":
                ours = lambda x, w, b, f=info.op: f(x, (x.shape[-1],), w, b)  # noqa: E731
                eager = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)  # noqa: E731
            else:
                ours = lambda x, w, b, f=info.op: f(x, (x.shape[-1],), w)  # noqa: E731
                eager = lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w)  # noqa: E731
            params = 2 if op == "layer_norm" else 1
            data = _nbytes((rows, cols), dtype)
            param = _nbytes((cols,), dtype)
            stats = rows * STATS_BYTES * (2 if op == "layer_norm" else 1)
            # forward: read x, params; write y, stats.
            forward = 2 * data + params * param + stats
            # backward: read dy, x, weight, stats; write dx, param grads.
            backward = 3 * data + param + stats + params * param
            case = lambda pass_, moved: Case(  # noqa: E731
                op, pass_, dtype_name(dtype), (rows, cols), "rows", moved, data)
            yield case("forward", forward), {
                "ours": lambda: lambda: ours(x, w, b),
                "eager": lambda: lambda: eager(x, w, b),
                "inductor": lambda: (lambda f: lambda: f(x, w, b))(_compiled(eager)),
            }
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            bg = b.clone().requires_grad_() if b is not None else None
            grad_inputs = (xg, wg, bg)
            yield case("forward+backward", forward + backward), {
                "ours": lambda: _forward_backward(ours, grad_inputs, dy),
                "eager": lambda: _forward_backward(eager, grad_inputs, dy),
                "inductor": lambda: _forward_backward(_compiled(eager), grad_inputs, dy),
            }


def batch_norm_cases(shapes, dtypes):
    """BatchNorm training, NCHW and channels-last (a generator, as row_norm_cases).
    The weight, bias and running statistics are float32 for every input dtype,
    as in mixed-precision training."""
    info = op_info("batch_norm")
    for shape in shapes:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            layout = "NHWC" if memory_format == torch.channels_last else "NCHW"
            channels = shape[1]
            for dtype in dtypes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
                dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
                w = torch.randn(channels, generator=g)
                b = torch.randn(channels, generator=g)
                running = {name: (torch.zeros(channels), torch.ones(channels))
                           for name in ("ours", "eager", "inductor")}

                def train(fn, name):
                    mean, var = running[name]
                    return lambda x, w, b: fn(x, mean, var, w, b, True, 0.1, 1e-5)

                data = _nbytes(shape, dtype)
                params = 2 * channels * 4
                forward = 2 * data + params + 4 * channels * 4
                backward = 3 * data + params + 2 * channels * 4 + 2 * channels * 4
                case = lambda pass_, moved: Case(  # noqa: E731
                    "batch_norm", pass_, dtype_name(dtype), shape, layout, moved, data)
                yield case("forward", forward), {
                    "ours": lambda: (lambda f: lambda: f(x, w, b))(train(info.op, "ours")),
                    "eager": lambda: (lambda f: lambda: f(x, w, b))(train(F.batch_norm, "eager")),
                    "inductor": lambda: (lambda f: lambda: f(x, w, b))(
                        _compiled(train(F.batch_norm, "inductor"))),
                }
                xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
                yield case("forward+backward", forward + backward), {
                    "ours": lambda: _forward_backward(train(info.op, "ours"), (xg, wg, bg), dy),
                    "eager": lambda: _forward_backward(train(F.batch_norm, "eager"), (xg, wg, bg), dy),
                    "inductor": lambda: _forward_backward(
                        _compiled(train(F.batch_norm, "inductor")), (xg, wg, bg), dy),
                }


def copy_of(bytes_moved):
    """A copy that moves `bytes_moved` bytes: reads half of them, writes half."""
    src = torch.randint(0, 255, (max(bytes_moved // 2, 1),), dtype=torch.uint8)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(case, makers, budget_s):
    """Median seconds and minor page faults per call of each contender, interleaved."""
    # Inductor's C++ runs the thread count it was compiled for, and neither
    # dynamo's guards nor the FX graph cache's key see torch.set_num_threads:
    # a fresh compile per thread count, with the count in inductor's config.
    torch._dynamo.reset()
    torch._inductor.config.cpp.threads = torch.get_num_threads()
    contenders = {name: make() for name, make in makers.items()}
    contenders["copy"] = copy_of(case.bytes_moved)
    for fn in contenders.values():  # warm up: compile, first-call costs, allocator, caches
        fn()
        fn()
    start = time.perf_counter()
    for fn in contenders.values():
        fn()
    per_round = time.perf_counter() - start
    reps = max(5, min(200, int(budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in contenders}
    faults = dict.fromkeys(contenders, 0)
    names = list(contenders)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            f0 = _minor_faults()
            t0 = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - t0)
            faults[name] += _minor_faults() - f0
    case.times = {name: statistics.median(values) for name, values in samples.items()}
    case.faults = {name: count / reps for name, count in faults.items()}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def label(case):
    shape = "x".join(map(str, case.shape))
    return f"{case.op} {case.pass_} {case.dtype} {case.layout} {shape}"


def ratio(case, peer):
    return case.times[peer] / case.times["ours"]


def copy_share(case, who):
    return case.times["copy"] / case.times[who]


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def l2_bytes():
    """The per-core L2 size (from sysfs), or 1 MiB where unknown."""
    path = Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
    try:
        text = path.read_text().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 1 << 20


def target_misses(cases, l2):
    """Lines naming each case and summary that misses a target (the allocators
    the targets are set for: glibc and tcmalloc)."""
    misses = []
    for allocator, threads in dict.fromkeys((c.allocator, c.threads) for c in cases):
        if allocator not in ("glibc", "tcmalloc"):
            continue
        subset = [c for c in cases if (c.allocator, c.threads) == (allocator, threads)]
        where = f"{allocator}, {threads} thread(s)"
        floor = TARGET_MIN_GLIBC if allocator == "glibc" else TARGET_MIN_TCMALLOC
        for peer in ("eager", "inductor"):
            ratios = [ratio(c, peer) for c in subset]
            if allocator == "tcmalloc" and geomean(ratios) < TARGET_GEOMEAN_TCMALLOC:
                misses.append(f"{where}: geomean vs {peer} {geomean(ratios):.2f}x "
                              f"< {TARGET_GEOMEAN_TCMALLOC}x")
            misses += [f"{where}: {label(c)} {ratio(c, peer):.2f}x vs {peer} < {floor}x"
                       for c in subset if ratio(c, peer) < floor]
        for c in subset:
            want = TARGET_COPY_SHARE[c.pass_]
            if c.input_bytes > l2 and copy_share(c, "ours") < want:
                misses.append(f"{where}: {label(c)} at {100 * copy_share(c, 'ours'):.0f}% of copy "
                              f"< {100 * want:.0f}%")
    return misses


def write_markdown(cases, path, header, l2):
    lines = [
        "# layernorm_ext CPU benchmark",
        "",
        *[f"- {key}: {value}" for key, value in header.items()],
        "",
        "Median times; vs eager / vs inductor = their time / ours; faults = minor page faults "
        "per call; % copy = the bandwidth of the bytes the op must move (inputs read once, "
        "outputs written once) against a `dst.copy_(src)` moving the same bytes in the same run. "
        "Every output comes from the process's allocator, ours and torch's alike.",
    ]
    for allocator in dict.fromkeys(c.allocator for c in cases):
        lines += [
            "", f"## {allocator}", "",
            "| op | pass | dtype | layout | shape | threads | ours ms | eager ms | inductor ms "
            "| vs eager | vs inductor | ours faults | eager faults | ours % copy | eager % copy "
            "| inductor % copy |",
            "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in (c for c in cases if c.allocator == allocator):
            t = c.times
            lines.append(
                f"| {c.op} | {c.pass_} | {c.dtype} | {c.layout} | {'x'.join(map(str, c.shape))} "
                f"| {c.threads} | {t['ours'] * 1e3:.3f} | {t['eager'] * 1e3:.3f} "
                f"| {t['inductor'] * 1e3:.3f} | {ratio(c, 'eager'):.2f}x | {ratio(c, 'inductor'):.2f}x "
                f"| {c.faults['ours']:.0f} | {c.faults['eager']:.0f} "
                + " ".join(f"| {100 * copy_share(c, who):.0f}%" for who in ("ours", "eager", "inductor"))
                + " |"
            )
    lines += ["", "## Geometric means", "",
              "| allocator | threads | cases | vs eager | min vs eager | vs inductor | min vs inductor |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for allocator in dict.fromkeys(c.allocator for c in cases):
        for threads in dict.fromkeys(c.threads for c in cases):
            subset = [c for c in cases if c.allocator == allocator and c.threads == threads]
            if subset:
                cells = []
                for peer in ("eager", "inductor"):
                    ratios = [ratio(c, peer) for c in subset]
                    cells += [f"{geomean(ratios):.2f}x", f"{min(ratios):.2f}x"]
                lines.append(f"| {allocator} | {threads} | {len(subset)} | " + " | ".join(cells) + " |")
    misses = target_misses(cases, l2)
    lines += ["", "## Targets missed", "",
              f"Targets: under tcmalloc a geomean >= {TARGET_GEOMEAN_TCMALLOC}x vs eager and vs "
              f"inductor and no case below {TARGET_MIN_TCMALLOC}x; under glibc no case below "
              f"{TARGET_MIN_GLIBC}x; for inputs past the L2 ({l2 >> 10} KiB), forward >= "
              f"{100 * TARGET_COPY_SHARE['forward']:.0f}% and forward+backward >= "
              f"{100 * TARGET_COPY_SHARE['forward+backward']:.0f}% of copy bandwidth.", ""]
    lines += [f"- {miss}" for miss in misses] or ["- none"]
    path.write_text("\n".join(lines) + "\n")


def write_plot(cases, path, header):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((c.allocator, c.threads) for c in cases))
    per_panel = max(len(cases) // len(panels), 1)
    # One column: each allocator and thread count gives a speedup row and a
    # bandwidth row over the same cases, labelled once at the bottom.
    fig, axes = plt.subplots(2 * len(panels), 1, squeeze=False, sharex=True,
                             figsize=(max(8, 0.3 * per_panel + 3), 2.6 * 2 * len(panels) + 3.5))
    width = 0.27
    for row, (allocator, threads) in enumerate(panels):
        subset = [c for c in cases if (c.allocator, c.threads) == (allocator, threads)]
        xs = range(len(subset))
        speedup, share = axes[2 * row][0], axes[2 * row + 1][0]
        for offset, peer in ((-width / 2, "eager"), (width / 2, "inductor")):
            speedup.bar([x + offset for x in xs], [ratio(c, peer) for c in subset], width,
                        label=f"vs {peer}")
        speedup.axhline(1.0, color="black", linewidth=0.8)
        speedup.set_yscale("log")
        speedup.set_ylabel("their time / ours (log)", fontsize=8)
        speedup.set_title(f"{allocator}, {threads} thread(s)", fontsize=9)
        for offset, who in ((-width, "ours"), (0, "eager"), (width, "inductor")):
            share.bar([x + offset for x in xs], [100 * copy_share(c, who) for c in subset], width,
                      label="layernorm_ext" if who == "ours" else who)
        share.set_ylabel("% of copy bandwidth", fontsize=8)
        # A copy slowed by a preempted thread would flatten every other bar.
        share.set_ylim(0, min(share.get_ylim()[1], 200))
        if row == 0:
            speedup.legend(fontsize=8)
            share.legend(fontsize=8)
    last = [c for c in cases if (c.allocator, c.threads) == panels[-1]]
    axes[-1][0].set_xticks(list(range(len(last))), [label(c) for c in last], rotation=90, fontsize=7)
    fig.suptitle(f"layernorm_ext vs torch eager and inductor on CPU: {header['machine']}, "
                 f"torch {header['torch']}, {header['commit']}, {header['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def preloaded_library(name):
    """The file of the loaded library whose name contains `name` (from /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if f"lib{name}" in Path(path).name:
                return path
    return None


def allocator_version(allocator):
    """The running allocator's version, asked of the allocator itself."""
    process = ctypes.CDLL(None)
    if allocator.startswith("glibc"):
        process.gnu_get_libc_version.restype = ctypes.c_char_p
        return f"glibc {process.gnu_get_libc_version().decode()}"
    if allocator == "tcmalloc":
        process.tc_version.restype = ctypes.c_char_p
        major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_char_p()
        version = process.tc_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        return version.decode()
    version, size = ctypes.c_char_p(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_char_p))
    process.mallctl(b"version", ctypes.byref(version), ctypes.byref(size), None, 0)
    return f"jemalloc {version.value.decode()}"


def run_allocator(args, cases):
    """Measures every case in this process (started with the allocator preloaded)."""
    library, _ = ALLOCATORS[args.allocator]
    if library is not None and preloaded_library(library) is None:
        sys.exit(f"bench_cpu: {args.allocator} is not loaded (LD_PRELOAD={os.environ.get('LD_PRELOAD')})")
    threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    results = []
    for case, makers in cases:
        for count in dict.fromkeys(threads):
            torch.set_num_threads(count)
            timed = Case(**{**asdict(case), "threads": count, "allocator": args.allocator})
            measure(timed, makers, args.budget)
            results.append(timed)
            print(f"{args.allocator:8s} t{count} {label(timed):50s} ours {timed.times['ours'] * 1e3:8.3f} ms"
                  f"  vs eager {ratio(timed, 'eager'):5.2f}x  vs inductor {ratio(timed, 'inductor'):5.2f}x"
                  f"  {100 * copy_share(timed, 'ours'):4.0f}% of copy"
                  f"  faults {timed.faults['ours']:.0f} / {timed.faults['eager']:.0f}", flush=True)
    return {"version": allocator_version(args.allocator),
            "library": preloaded_library(library) if library else "libc",
            "cases": [asdict(c) for c in results]}


def child_environment(allocator):
    library, settings = ALLOCATORS[allocator]
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    if library is not None:
        found = ctypes.util.find_library(library)
        if found is None:
            sys.exit(f"bench_cpu: lib{library} not found (Debian: apt-get install "
                     "libtcmalloc-minimal4 libjemalloc2)")
        env["LD_PRELOAD"] = found
    for key, value in settings.items():
        env.setdefault(key, value)
    return env


def load_average():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="layer_norm,rms_norm,batch_norm",
                        help="comma-separated subset of layer_norm, rms_norm, batch_norm")
    parser.add_argument("--threads", default="1,all",
                        help="comma-separated thread counts; 'all' = every core")
    parser.add_argument("--allocators", default="glibc,tcmalloc",
                        help=f"comma-separated subset of {', '.join(ALLOCATORS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of measurement per case (default 0.6, --quick 0.15)")
    parser.add_argument("--quick", action="store_true",
                        help="float32 only, two row shapes and one BatchNorm shape")
    parser.add_argument("--out", default=None,
                        help="directory for cpu.md and cpu.png (default benchmarks/results, "
                             "with --quick a directory under the temporary one)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="write cpu.md and cpu.png from the cpu.json of an earlier run, "
                             "measuring nothing")
    parser.add_argument("--allocator", help=argparse.SUPPRESS)  # the child's own allocator
    parser.add_argument("--json", help=argparse.SUPPRESS)  # where the child writes its results
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 0.15 if args.quick else 0.6
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = set(ops) - {"layer_norm", "rms_norm", "batch_norm"}
    if unknown:
        parser.error(f"unknown ops: {', '.join(sorted(unknown))}")
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    if set(allocators) - set(ALLOCATORS):
        parser.error(f"unknown allocators: {', '.join(sorted(set(allocators) - set(ALLOCATORS)))}")

    if args.allocator:
        dtypes = QUICK_DTYPES if args.quick else DTYPES

        def cases():
            for op in ops:
                if op == "batch_norm":
                    yield from batch_norm_cases(
                        QUICK_BATCH_NORM_SHAPES if args.quick else BATCH_NORM_SHAPES, dtypes)
                else:
                    yield from row_norm_cases(op, QUICK_ROW_SHAPES if args.quick else ROW_SHAPES, dtypes)

        Path(args.json).write_text(json.dumps(run_allocator(args, cases())))
        return

    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.gettempdir()) / "layernorm_ext_bench_cpu_quick"
    else:
        out = ROOT / "benchmarks" / "results"
    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
    else:
        run = measure_all(allocators, argv)
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        (out / "cpu.json").write_text(json.dumps(run, indent=1))
    cases = [Case(**{**c, "shape": tuple(c["shape"])}) for c in run["cases"]]
    write_markdown(cases, out / "cpu.md", run["header"], l2_bytes())
    write_plot(cases, out / "cpu.png", run["header"])
    print(f"wrote {out / 'cpu.md'} and {out / 'cpu.png'}")


def measure_all(allocators, argv):
    """Runs a child per allocator; returns the header and every measured case."""
    load_before = load_average()
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for allocator in allocators:
            path = Path(tmp) / f"{allocator}.json"
            subprocess.run([sys.executable, __file__, *argv, "--allocator", allocator, "--json", str(path)],
                           env=child_environment(allocator), check=True)
            reports[allocator] = json.loads(path.read_text())
    header = {
        "machine": cpu_description(),
        "torch": torch.__version__,
        "allocators": "; ".join(f"{name}: {r['version']} ({r['library']})" for name, r in reports.items()),
        "layernorm_ext simd": layernorm_ext.build_info()["simd"],
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load average (1, 5, 15 min) before / after": f"{load_before} / {load_average()}",
        "command": "python benchmarks/bench_cpu.py " + " ".join(argv),
    }
    return {"header": header, "cases": [c for report in reports.values() for c in report["cases"]]}


if __name__ == "__main__":
    main()

"""Accuracy report: layernorm_ext's error against float64, side by side with
torch's, per op, dtype and shape, for outputs, statistics and gradients.

    python benchmarks/bench_accuracy.py [--quick] [--backends cpu,cuda_emulated]
                                        [--seeds 3] [--out benchmarks/results]

The reference is torch's own op in float64 on the upcast inputs. Ours is the
layernorm_ext op (the CPU kernels, or the CUDA kernels on the tests' CPU
executor for ``cuda_emulated``); torch's is torch's CPU op in the input dtype.
Error per element: |value - ref| / (|ref| + rms(ref)), rms over the whole
quantity, so that elements near zero are judged against the quantity's scale
rather than their own; reported as the max and the mean over the elements and
seeds. Data is fresh random per seed, "centred" (N(0, 1)) and "offset"
(3 + N(0, 1), a mean large against the spread).

Writes <out>/accuracy_cpu.md and <out>/accuracy_cuda_emulated.md: a summary
(worst ours/torch ratio per op, dtype and quantity) and the full table.
"""

import argparse
import datetime
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import layernorm_ext  # noqa: E402
from _report import cpu_description, git_commit  # noqa: E402

EPS = 1e-5
MOMENTUM = 0.1
DATA = {"centred": (0.0, 1.0), "offset": (3.0, 1.0)}  # (mean, std) of the input


@dataclass(frozen=True)
class Case:
    op: str  # layer_norm, rms_norm, batch_norm_train, batch_norm_eval
    shape: tuple  # input shape
    norm_dims: int = 1  # row norms: the normalized trailing dims
    channels_last: bool = False


def row_cases(shapes):
    return [Case(op, shape, dims) for op in ("layer_norm", "rms_norm") for shape, dims in shapes]


def batch_norm_cases(shapes):
    return [Case(op, shape, channels_last=cl) for op in ("batch_norm_train", "batch_norm_eval")
            for shape, cl in shapes]


# Rows 1..65536, columns 1..65537 (primes and powers of two), tall-and-thin
# and short-and-wide; (128, 5, 5) over (5, 5) is a ModuleInfo sample.
ROW_SHAPES = [
    ((1, 1), 1), ((1, 7), 1), ((3, 1024), 1), ((1, 65537), 1), ((2, 65536), 1),
    ((65536, 1), 1), ((65536, 5), 1), ((128, 5, 5), 2), ((4096, 3), 1), ((8192, 31), 1),
    ((2048, 127), 1), ((512, 768), 1), ((1024, 1024), 1), ((256, 1031), 1), ((64, 4099), 1),
    ((16, 16411), 1),
]
# N * H * W from 2 to 10^6, plane and row layouts.
BATCH_NORM_SHAPES = [
    ((2, 3), False), ((2, 5, 1, 1), False), ((16, 4, 5, 5), False), ((128, 64), False),
    ((4096, 32), False), ((32, 16, 14, 14), False), ((8, 16, 28, 28), True), ((8, 8, 32, 32), False),
    ((4, 4, 128, 128), False), ((16, 2, 128, 128), False), ((4, 2, 500, 500), False),
    ((1000000, 2), False),
]
QUICK_ROW_SHAPES = [((1, 7), 1), ((128, 5, 5), 2), ((4096, 3), 1), ((512, 768), 1), ((2, 65537), 1)]
QUICK_BATCH_NORM_SHAPES = [((2, 3), False), ((16, 4, 5, 5), False), ((32, 16, 14, 14), False),
                           ((4096, 32), False), ((4, 2, 500, 500), False)]
# The CPU executor runs a GPU thread as a fiber: small shapes only.
EMULATED_ROW_SHAPES = [((1, 7), 1), ((128, 5, 5), 2), ((512, 3), 1), ((64, 127), 1),
                       ((16, 768), 1), ((2, 4099), 1), ((1, 16411), 1)]
EMULATED_BATCH_NORM_SHAPES = [((2, 3), False), ((16, 4, 5, 5), False), ((8, 4, 14, 14), False),
                              ((8, 4, 14, 14), True), ((512, 8), False), ((2, 2, 64, 64), False)]
LOW_PRECISION_ROW_SHAPES = [((128, 5, 5), 2), ((4096, 3), 1), ((512, 768), 1), ((2, 65537), 1)]
LOW_PRECISION_BATCH_NORM_SHAPES = [((16, 4, 5, 5), False), ((32, 16, 14, 14), False),
                                   ((4096, 32), False), ((4, 2, 500, 500), False)]


def relative_error(value, ref):
    """(max, sum, count) of |value - ref| / (|ref| + rms(ref)) over the elements."""
    value = value.detach().reshape(-1).double()
    ref = ref.detach().reshape(-1).double()
    if ref.numel() == 0:
        return 0.0, 0.0, 0
    diff = (value - ref).abs()
    scale = ref.square().mean().sqrt()
    err = torch.where(diff == 0, torch.zeros_like(diff), diff / (ref.abs() + scale))
    return err.max().item(), err.sum().item(), err.numel()


def _random(shape, dtype, generator, mean=0.0, std=1.0):
    return (torch.randn(shape, dtype=torch.float64, generator=generator) * std + mean).to(dtype)


def make_inputs(case, dtype, data, generator):
    mean, std = DATA[data]
    x = _random(case.shape, dtype, generator, mean, std)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if case.op.startswith("batch_norm"):
        param_shape = (case.shape[1],)
    else:
        param_shape = case.shape[len(case.shape) - case.norm_dims:]
    inputs = {
        "x": x,
        "dy": _random(case.shape, dtype, generator),
        "weight": _random(param_shape, dtype, generator, 1.0, 0.5),
        "bias": _random(param_shape, dtype, generator, 0.0, 0.5),
    }
    if case.op.startswith("batch_norm"):
        inputs["running_mean"] = _random(param_shape, dtype, generator, mean, 1.0)
        inputs["running_var"] = _random(param_shape, torch.float64, generator).abs().add(0.5).to(dtype)
    return inputs


def torch_results(case, inputs, dtype=None):
    """torch's quantities, in the inputs' dtype or upcast to `dtype`."""
    t = {k: (v.to(dtype) if dtype is not None else v.clone()) for k, v in inputs.items()}
    x = t["x"].requires_grad_()
    weight = t["weight"].requires_grad_()
    out = {}
    if case.op == "layer_norm":
        normalized = list(case.shape[len(case.shape) - case.norm_dims:])
        bias = t["bias"].requires_grad_()
        y = F.layer_norm(x, normalized, weight, bias, EPS)
        params = [weight, bias]
        _, mean, rstd = torch.ops.aten.native_layer_norm(x.detach(), normalized, weight.detach(),
                                                         bias.detach(), EPS)
        out["mean"], out["rstd"] = mean, rstd
    elif case.op == "rms_norm":
        normalized = list(case.shape[len(case.shape) - case.norm_dims:])
        y = F.rms_norm(x, normalized, weight, EPS)
        params = [weight]
        out["rstd"] = torch.ops.aten._fused_rms_norm(x.detach(), normalized, weight.detach(), EPS)[1]
    else:
        training = case.op == "batch_norm_train"
        bias = t["bias"].requires_grad_()
        running_mean, running_var = t["running_mean"], t["running_var"]
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
        params = [weight, bias]
        if training:
            _, mean, invstd = torch.ops.aten.native_batch_norm(
                x.detach(), weight.detach(), bias.detach(), None, None, True, MOMENTUM, EPS)
            out["mean"], out["rstd"] = mean, invstd
            out["running_mean"], out["running_var"] = running_mean, running_var
    out["output"] = y
    grads = torch.autograd.grad(y, [x] + params, t["dy"])
    out["grad_input"], out["grad_weight"] = grads[0], grads[1]
    if len(grads) > 2:
        out["grad_bias"] = grads[2]
    return out


def our_results(ns, case, inputs):
    x, dy, weight, bias = inputs["x"], inputs["dy"], inputs["weight"], inputs["bias"]
    out = {}
    if case.op == "layer_norm":
        normalized = list(case.shape[len(case.shape) - case.norm_dims:])
        y, mean, rstd = ns.layer_norm_forward(x, normalized, weight, bias, EPS)
        dx, dw, db = ns.layer_norm_backward(dy, x, normalized, mean, rstd, weight, bias,
                                            [True, True, True])
        out.update(mean=mean, rstd=rstd, grad_bias=db)
    elif case.op == "rms_norm":
        normalized = list(case.shape[len(case.shape) - case.norm_dims:])
        y, rstd = ns.rms_norm_forward(x, normalized, weight, EPS)
        dx, dw = ns.rms_norm_backward(dy, x, normalized, rstd, weight, [True, True])
        out.update(rstd=rstd)
    else:
        training = case.op == "batch_norm_train"
        y, mean, rstd, new_mean, new_var = ns.batch_norm_forward(
            x, weight, bias, inputs["running_mean"], inputs["running_var"], training, MOMENTUM, EPS)
        dx, dw, db = ns.batch_norm_backward(dy, x, weight, bias, mean, rstd, training,
                                            [True, True, True])
        out.update(grad_bias=db)
        if training:
            out.update(mean=mean, rstd=rstd, running_mean=new_mean, running_var=new_var)
    out.update(output=y, grad_input=dx, grad_weight=dw)
    return out


QUANTITIES = ("output", "mean", "rstd", "running_mean", "running_var", "grad_input",
              "grad_weight", "grad_bias")


def measure(ns, case, dtype, data, seeds):
    """{quantity: {"ours": (max, mean), "torch": (max, mean)}} over the seeds."""
    totals = {}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(repr((case, dtype, data)).encode()))
        inputs = make_inputs(case, dtype, data, generator)
        ref = torch_results(case, inputs, torch.float64)
        results = {"ours": our_results(ns, case, inputs), "torch": torch_results(case, inputs)}
        for who, values in results.items():
            for quantity, value in values.items():
                peak, total, count = relative_error(value, ref[quantity])
                entry = totals.setdefault(quantity, {}).setdefault(who, [0.0, 0.0, 0])
                entry[0] = max(entry[0], peak)
                entry[1] += total
                entry[2] += count
    return {q: {who: (e[0], e[1] / max(e[2], 1)) for who, e in by.items()}
            for q, by in totals.items()}


def _ratio(ours, theirs):
    if ours == 0:
        return 0.0
    return ours / theirs if theirs > 0 else math.inf


def _shape_text(case):
    text = "x".join(map(str, case.shape))
    if case.op in ("layer_norm", "rms_norm") and case.norm_dims > 1:
        text += f" over {case.norm_dims} dims"
    if case.channels_last:
        text += " channels_last"
    return text


def run(ns, cases_by_dtype, seeds, log):
    rows = []
    for dtype, cases in cases_by_dtype.items():
        for case in cases:
            for data in DATA:
                errors = measure(ns, case, dtype, data, seeds)
                for quantity in QUANTITIES:
                    if quantity not in errors:
                        continue
                    e = errors[quantity]
                    rows.append((case, dtype, data, quantity, e["ours"], e["torch"]))
                log(f"{case.op} {str(dtype)[6:]} {data} {_shape_text(case)}: output max "
                    f"{errors['output']['ours'][0]:.2e} vs {errors['output']['torch'][0]:.2e}")
    return rows


def render(rows, title, backend_note, seeds):
    lines = [
        f"# {title}",
        "",
        f"- machine: {cpu_description()}",
        f"- torch: {torch.__version__}",
        f"- layernorm_ext simd: {layernorm_ext.build_info().get('simd', 'n/a')}",
        f"- commit: {git_commit()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- seeds per case: {seeds}; data: centred N(0, 1) and offset 3 + N(0, 1)",
        "",
        f"Ours: {backend_note}. Torch: torch's CPU ops in the same dtype. Reference: torch's ops "
        "in float64 on the upcast inputs. Error per element: |value - ref| / (|ref| + rms(ref)); "
        "max and mean over elements and seeds. ours/torch > 1 means ours is less accurate; "
        "stats are mean and rstd (BatchNorm training: the batch's, and the updated running "
        "stats).",
        "",
        "## Summary: worst ours/torch over shapes and data",
        "",
        "| op | dtype | quantity | worst max ratio | worst mean ratio | at (max) |",
        "|---|---|---|---:|---:|---|",
    ]
    worst = {}
    for case, dtype, data, quantity, ours, theirs in rows:
        key = (case.op, str(dtype)[6:], quantity)
        max_ratio, mean_ratio = _ratio(ours[0], theirs[0]), _ratio(ours[1], theirs[1])
        w = worst.setdefault(key, [0.0, 0.0, ""])
        if max_ratio > w[0]:
            w[0], w[2] = max_ratio, f"{data} {_shape_text(case)}"
        w[1] = max(w[1], mean_ratio)
    for (op, dtype, quantity), (max_ratio, mean_ratio, where) in worst.items():
        lines.append(f"| {op} | {dtype} | {quantity} | {max_ratio:.2f} | {mean_ratio:.2f} | {where} |")
    lines += [
        "",
        "## All cases",
        "",
        "| op | dtype | data | shape | quantity | ours max | torch max | ratio | ours mean "
        "| torch mean | ratio |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, dtype, data, quantity, ours, theirs in rows:
        lines.append(
            f"| {case.op} | {str(dtype)[6:]} | {data} | {_shape_text(case)} | {quantity} "
            f"| {ours[0]:.2e} | {theirs[0]:.2e} | {_ratio(ours[0], theirs[0]):.2f} "
            f"| {ours[1]:.2e} | {theirs[1]:.2e} | {_ratio(ours[1], theirs[1]):.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short sweep")
    parser.add_argument("--backends", default="cpu,cuda_emulated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    low = (torch.bfloat16, torch.float16)
    for backend in args.backends.split(","):
        if backend == "cpu":
            ns = torch.ops.layernorm_ext
            row, bn = (QUICK_ROW_SHAPES, QUICK_BATCH_NORM_SHAPES) if args.quick else (
                ROW_SHAPES, BATCH_NORM_SHAPES)
            low_row, low_bn = (row[:2], bn[:2]) if args.quick else (
                LOW_PRECISION_ROW_SHAPES, LOW_PRECISION_BATCH_NORM_SHAPES)
            note = "the CPU kernels"
        elif backend == "cuda_emulated":
            from cuda_emulator import build

            build.load()
            ns = torch.ops.layernorm_ext_cuda_emulated
            row, bn = EMULATED_ROW_SHAPES, EMULATED_BATCH_NORM_SHAPES
            if args.quick:
                row, bn = row[:3], bn[:3]
            low_row, low_bn = row[:2], bn[:2]
            note = "the CUDA kernels, run on the tests' CPU executor (tests/cuda_emulator)"
        else:
            raise SystemExit(f"unknown backend {backend!r}: expected cpu or cuda_emulated")
        cases = {torch.float32: row_cases(row) + batch_norm_cases(bn)}
        for dtype in low:
            cases[dtype] = row_cases(low_row) + batch_norm_cases(low_bn)
        rows = run(ns, cases, args.seeds, lambda text: print(f"[{backend}] {text}", flush=True))
        text = render(rows, f"layernorm_ext accuracy against float64 ({backend})", note, args.seeds)
        path = out / f"accuracy_{backend}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``python -m layernorm_ext``: is this install working, and is it fast here?

Prints (1) how the extension was built (:func:`layernorm_ext.build_info`),
(2) a self-check of every op in :data:`OPS` on every device it can run on:
forward and backward on random float64 data against the torch function it
replaces, one PASS/FAIL line per op and device, and (3) a short speed table
against torch (forward, float32). ``--json`` prints all of it as one JSON
object instead. Exits 1 if any check failed, else 0.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import layernorm_ext
from layernorm_ext.op_db import OP_DB

# float64 on both sides: the only differences left are rounding in a
# different order, orders of magnitude below float32's epsilon (1.2e-7).
CHECK_TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}
CHECK_SEED = 1234
SPEED_DTYPE = torch.float32
SPEED_REPEATS = 7


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the self-check and the speed table: an op of op_db.OP_DB,
    in one mode (``sample_options``, passed to its ``make_sample``).

    ``function`` names the layernorm_ext function, looked up when the op is
    run: a function the package lacks is a failed check, not a skipped one.
    ``reference`` is torch's equivalent, with the same arguments and outputs.
    The tensors a sample made with ``requires_grad`` marks are those whose
    gradients are compared.
    """

    label: str
    function: str
    reference: Callable
    make_sample: Callable
    sample_options: dict
    check_shape: tuple
    speed_shapes: tuple

    def make_args(self, shape, device, dtype, generator, requires_grad):
        """Fresh random ``(args, kwargs)`` of an input of ``shape``."""
        sample = self.make_sample(shape, device, dtype, requires_grad, generator=generator,
                                  **self.sample_options)
        return sample.args, sample.kwargs


def _random(shape, device, dtype, generator):
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    return values.to(device=device, dtype=dtype)


ROW_CHECK_SHAPE = (5, 3, 67)
ROW_SPEED_SHAPES = ((4096, 1024), (512, 8192))
BATCH_CHECK_SHAPE = (6, 5, 4, 3)
BATCH_SPEED_SHAPES = ((32, 64, 56, 56),)


def _ops() -> tuple:
    """Each op of OP_DB: the row norms over their last dim, BatchNorm in
    training and in eval."""
    ops = []
    for info in OP_DB:
        if info.name == "batch_norm":
            ops += [
                Op(f"batch_norm ({mode})", info.name, info.ref, info.make_sample,
                   {"training": mode == "training"}, BATCH_CHECK_SHAPE, BATCH_SPEED_SHAPES)
                for mode in ("training", "eval")
            ]
        else:
            ops.append(Op(info.name, info.name, info.ref, info.make_sample, {}, ROW_CHECK_SHAPE,
                          ROW_SPEED_SHAPES))
    return tuple(ops)


OPS = _ops()


def devices() -> list:
    """CPU, and CUDA when the extension has CUDA kernels and a GPU is usable."""
    return ["cpu"] + (["cuda"] if layernorm_ext.build_info()["cuda_available"] else [])


def _tensors(args, kwargs) -> list:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _copy_args(args, kwargs):
    """Independent copies (the ops may update running statistics in place)."""

    def copy(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().clone().requires_grad_(value.requires_grad)

    return [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}


def _as_list(outputs) -> list:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _compare(what: str, actual: list, expected: list) -> None:
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: {len(actual)} tensors, torch gives {len(expected)}")
    for index, (a, e) in enumerate(zip(actual, expected)):
        if a is None or e is None:
            if a is not e:
                raise AssertionError(f"{what} #{index}: {a!r} where torch gives {e!r}")
            continue
        try:
            torch.testing.assert_close(a, e, **CHECK_TOLERANCE)
        except AssertionError as error:
            raise AssertionError(f"{what} #{index}: {error}") from None


def check_op(op: Op, device: str) -> None:
    """Raises AssertionError (or the op's own error) unless ``op`` matches torch on ``device``."""
    function = getattr(layernorm_ext, op.function, None)
    if function is None:
        raise AssertionError(f"layernorm_ext has no function {op.function!r}")
    generator = torch.Generator().manual_seed(CHECK_SEED)
    args, kwargs = op.make_args(op.check_shape, device, torch.float64, generator, True)
    ref_args, ref_kwargs = _copy_args(args, kwargs)

    outputs = _as_list(function(*args, **kwargs))
    expected = _as_list(op.reference(*ref_args, **ref_kwargs))
    _compare("output", outputs, expected)
    # Tensors the op may update in place (BatchNorm's running statistics).
    _compare("argument after the call", _tensors(args, kwargs), _tensors(ref_args, ref_kwargs))

    grad_outputs = [_random(e.shape, device, e.dtype, generator) for e in expected]
    inputs = [t for t in _tensors(args, kwargs) if t.requires_grad]
    ref_inputs = [t for t in _tensors(ref_args, ref_kwargs) if t.requires_grad]
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    ref_grads = torch.autograd.grad(expected, ref_inputs, grad_outputs, allow_unused=True)
    _compare("gradient of argument", list(grads), list(ref_grads))


def run_checks() -> list:
    results = []
    for device in devices():
        for op in OPS:
            try:
                check_op(op, device)
                detail = "forward and backward match torch"
                passed = True
            # Every failure is reported, whatever raised it.
            except Exception as error:  # noqa: BLE001
                detail = f"{type(error).__name__}: {error}"
                passed = False
            results.append({"op": op.label, "device": device, "passed": passed, "detail": detail})
    return results


def _median_ms(functions, args, kwargs, device) -> list:
    """Median wall time of each function, in ms; runs alternate between them so
    that a load change on the machine hits all of them alike."""

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    times = [[] for _ in functions]
    for repeat in range(SPEED_REPEATS + 1):
        for function, samples in zip(functions, times):
            synchronize()
            start = time.perf_counter()
            function(*args, **kwargs)
            synchronize()
            if repeat > 0:  # the first run warms up caches and allocators
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) * 1e3 for samples in times]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_speed(passed_ops: set) -> list:
    """Forward time of ours and torch's on a few shapes, for ops that passed their check."""
    rows = []
    generator = torch.Generator().manual_seed(CHECK_SEED)
    with torch.no_grad():
        for device in devices():
            for op in OPS:
                if (op.label, device) not in passed_ops:
                    continue
                function = getattr(layernorm_ext, op.function)
                for shape in op.speed_shapes:
                    args, kwargs = op.make_args(shape, device, SPEED_DTYPE, generator, False)
                    ours, theirs = _median_ms((function, op.reference), args, kwargs, device)
                    rows.append(
                        {
                            "op": op.label,
                            "device": device,
                            "shape": list(shape),
                            "dtype": _dtype_name(SPEED_DTYPE),
                            "ours_ms": ours,
                            "torch_ms": theirs,
                            "speedup": theirs / ours,
                        }
                    )
    return rows


def _print_report(report: dict) -> None:
    info = report["build_info"]
    print(f"layernorm_ext {report['version']}")
    print("build:")
    for key, value in info.items():
        print(f"  {key:<15} {value}")

    print("\nself-check against torch (float64, forward and backward):")
    for check in report["checks"]:
        status = "PASS" if check["passed"] else "FAIL"
        detail = "" if check["passed"] else check["detail"]
        print(f"  {status}  {check['device']:<5} {check['op']:<22} {detail}".rstrip())

    if report["speed"]:
        print(f"\nspeed (forward, {_dtype_name(SPEED_DTYPE)}, median of {SPEED_REPEATS} runs):")
        print(
            f"  {'device':<6} {'op':<22} {'shape':<18} {'ours ms':>9} {'torch ms':>9} {'speedup':>8}"
        )
        for row in report["speed"]:
            shape = "x".join(map(str, row["shape"]))
            print(
                f"  {row['device']:<6} {row['op']:<22} {shape:<18} {row['ours_ms']:>9.3f} "
                f"{row['torch_ms']:>9.3f} {row['speedup']:>7.2f}x"
            )

    failed = sum(not check["passed"] for check in report["checks"])
    total = len(report["checks"])
    print(f"\n{failed} of {total} checks FAILED" if failed else f"\nall {total} checks passed")


def main(argv=None) -> int:
    """Runs the report; returns the exit status (0: every check passed, 1: any failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m layernorm_ext", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed table")
    options = parser.parse_args(argv)

    checks = run_checks()
    passed_ops = {(c["op"], c["device"]) for c in checks if c["passed"]}
    report = {
        "version": layernorm_ext.__version__,
        "build_info": layernorm_ext.build_info(),
        "checks": checks,
        "speed": [] if options.no_speed else run_speed(passed_ops),
        "passed": all(c["passed"] for c in checks),
    }
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

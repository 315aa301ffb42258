"""float32 accuracy no worse than torch's: our error against float64 and
torch's, measured as benchmarks/bench_accuracy.py measures it (the same
metric, data and reference), on the shapes and quantities where the
kernels used to be less accurate than torch's CPU ops."""

import sys
from pathlib import Path

import pytest
import torch

import layernorm_ext

from backends import backend_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_accuracy  # noqa: E402
from bench_accuracy import Case  # noqa: E402

SEEDS = 4
# Our max and mean error over the seeds may exceed torch's by this factor:
# two roundings' worth of luck on a few seeds, not a systematic loss.
MARGIN = 1.25

# (case, data, quantities)
CPU_CASES = [
    # The ModuleInfo sample whose weight gradient was less accurate than
    # torch's in most seeds: 128 rows of 25 columns.
    (Case("layer_norm", (128, 5, 5), 2), "centred", ("output", "rstd", "grad_weight")),
    (Case("layer_norm", (128, 5, 5), 2), "offset", ("output", "rstd", "grad_weight")),
    # Long rows: many chunk sums.
    (Case("layer_norm", (2, 65537)), "centred", ("output", "rstd")),
    (Case("rms_norm", (2, 65537)), "offset", ("rstd",)),
    # BatchNorm planes: one statistics block, and many (10^6 values).
    (Case("batch_norm_train", (32, 16, 14, 14)), "centred", ("rstd", "grad_weight")),
    (Case("batch_norm_train", (32, 16, 14, 14)), "offset", ("output", "rstd", "grad_weight")),
    (Case("batch_norm_train", (4, 2, 500, 500)), "offset", ("rstd", "running_var")),
    # BatchNorm rows (2-D and channels-last): column sums over many rows.
    (Case("batch_norm_train", (128, 64)), "centred", ("output", "rstd", "grad_input")),
    (Case("batch_norm_train", (128, 64)), "offset", ("rstd", "grad_weight")),
    (Case("batch_norm_eval", (8, 16, 28, 28), channels_last=True), "centred", ("grad_bias",)),
    # Tall and thin: the weight gradient's column sums over many rows.
    (Case("rms_norm", (4096, 3)), "offset", ("grad_weight",)),
    (Case("rms_norm", (4096, 3)), "centred", ("grad_weight",)),
    (Case("rms_norm", (65536, 5)), "centred", ("grad_weight",)),
    # Many long rows: the partials' 4 MiB bound, not the chain length, sets
    # the weight gradient's blocks (409 blocks of 20 rows).
    (Case("layer_norm", (8192, 1280)), "offset", ("grad_weight", "grad_bias")),
]

# The CUDA kernels on the CPU executor, at the executor's sizes: where rstd
# rounded in float32 (and eps rounded to float32 first) made them less
# accurate than torch's CPU ops.
CUDA_CASES = [
    (Case("rms_norm", (1, 7)), "offset", ("rstd", "grad_input")),
    (Case("batch_norm_train", (2, 2, 64, 64)), "centred", ("rstd", "grad_input")),
    (Case("batch_norm_eval", (512, 8)), "offset", ("grad_input",)),
]


def _ids(cases):
    return [f"{case.op}-{'x'.join(map(str, case.shape))}-{data}" for case, data, _ in cases]


def _assert_at_most_torchs(backend, case, data, quantities):
    errors = bench_accuracy.measure(backend.ops(), case, torch.float32, data, SEEDS)
    for quantity in quantities:
        ours, theirs = errors[quantity]["ours"], errors[quantity]["torch"]
        assert ours[0] <= MARGIN * theirs[0], (
            f"{case} {data} {quantity}: max error {ours[0]:.3e} against torch's {theirs[0]:.3e}")
        assert ours[1] <= MARGIN * theirs[1], (
            f"{case} {data} {quantity}: mean error {ours[1]:.3e} against torch's {theirs[1]:.3e}")


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("case,data,quantities", CPU_CASES, ids=_ids(CPU_CASES))
def test_float32_error_at_most_torchs(backend, case, data, quantities):
    _assert_at_most_torchs(backend, case, data, quantities)


@pytest.mark.parametrize("backend", backend_params("cuda_emulated"))
@pytest.mark.parametrize("case,data,quantities", CUDA_CASES, ids=_ids(CUDA_CASES))
def test_cuda_kernels_float32_error_at_most_torchs(backend, case, data, quantities):
    _assert_at_most_torchs(backend, case, data, quantities)


@pytest.mark.parametrize(
    "shape,channels_last", [((128, 64), False), ((300, 1024), False), ((16, 24, 9, 9), True)])
def test_batch_norm_rows_whose_first_rows_stand_apart(shape, channels_last):
    """Grouped or sorted data: the first 8 rows of the batch lie 40 standard
    deviations from the rest. A shift taken from the first rows alone would
    leave the one-sweep variance to cancel 15 roundings; the output and the
    updated running variance must stay as accurate as torch's."""
    channels = shape[1]
    worst = {"ours": [0.0, 0.0], "torch": [0.0, 0.0]}
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen)
        x[:8] += 40
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        running_ref = [torch.zeros(channels, dtype=torch.float64),
                       torch.ones(channels, dtype=torch.float64)]
        ref = torch.nn.functional.batch_norm(x.double(), *running_ref, None, None, True, 1.0, 1e-5)
        for name, fn in (("ours", layernorm_ext.batch_norm),
                         ("torch", torch.nn.functional.batch_norm)):
            running = [torch.zeros(channels), torch.ones(channels)]
            y = fn(x, *running, None, None, True, 1.0, 1e-5)
            errors = (bench_accuracy.relative_error(y, ref)[0],
                      bench_accuracy.relative_error(running[1], running_ref[1])[0])
            worst[name] = [max(w, e) for w, e in zip(worst[name], errors)]
    for k, quantity in enumerate(("output", "running_var")):
        assert worst["ours"][k] <= MARGIN * worst["torch"][k], (
            f"{quantity}: max error {worst['ours'][k]:.3e} against torch's {worst['torch'][k]:.3e}")

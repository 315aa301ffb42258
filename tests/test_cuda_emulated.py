"""Every CUDA kernel, run on the CPU executor (tests/cuda_emulator) through the
CUDA glue (the cuda_emulated backend: torch.ops.layernorm_ext_cuda_emulated),
against the CPU kernels (the cpu backend) and float64 torch, for every op of
the registry (layernorm_ext.op_db) in every dtype pair the kernels instantiate.

The shapes are chosen by the launch plans of csrc/cuda: row lengths that take
the warp path at every lane-pack count, the cached block path and the long-row
path, vectorized and scalar; BatchNorm shapes that take the NCHW reduction
with short and long runs and the channels-last one, with one and several
splits per channel, and vectorized and scalar elementwise sweeps. The session
reports which of the instantiated kernels ran (`.ci/run` requires all).
Every emulated op call runs under both thread schedules and fails unless they
agree to the bit (emulated_ops.cpp).
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

from backends import backend
from layernorm_ext.op_db import OP_DB, TOLERANCES, make_tensor

pytestmark = pytest.mark.cuda_emulated

CPU = backend("cpu")
EMULATED = backend("cuda_emulated")

# (input dtype, parameter dtype): every pair the CUDA row-norm kernels instantiate.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
# The warp path with 1, 2, 4 and 8 packs of 16 bytes a lane (float: 32, 256,
# 512, 1000; double: 32, 128, 256, 512; half: 128, 1000, 2048), the scalar
# warp path (1, 7, 31), the cached block path (33 scalar, 4096 vector, 4097
# scalar) and the long-row path past the 64 KiB cache (65536, 65537).
ROW_COLS = [1, 7, 31, 32, 33, 128, 256, 512, 1000, 1024, 2048, 4096, 4097, 65536, 65537]
# BatchNorm: (shape, layout). NCHW runs of 33 and 7 (short: one value a thread
# across samples) and 256 or 1600 (long: a run at a time); 4800 values a
# channel split in two; 2-D inputs and channels-last take the tile reduction;
# C or inner divisible by the pack width take 16-byte sweeps, odd ones (33,
# 7x9, C = 5) one element at a time.
BATCH_NORM_SHAPES = [
    ((64, 24), "contiguous"),
    ((300, 10), "contiguous"),
    ((4, 6, 33), "contiguous"),
    ((8, 16, 16, 16), "contiguous"),
    ((3, 5, 40, 40), "contiguous"),
    ((2, 3, 4, 5, 7), "contiguous"),
    ((8, 16, 16, 16), "channels_last"),
    ((4, 5, 7, 9), "channels_last"),
    ((16, 40, 32, 32), "channels_last"),
    ((2, 8, 3, 5, 6), "channels_last"),
]


def rows_for(cols):
    """Enough rows for several blocks, grid-stride steps and weight-gradient
    chunks on short rows; few on long ones."""
    return max(2, min(300, 40000 // cols))


def kernel_cases():
    """(op, dtype pair, case): every op on every shape of its launch plan."""
    for info in OP_DB:
        for dtypes in DTYPE_PAIRS:
            if info.name == "batch_norm":
                for (shape, layout) in BATCH_NORM_SHAPES:
                    for training in (True, False):
                        mode = "training" if training else "eval"
                        yield pytest.param(info, dtypes, (shape, layout, training),
                                           id=f"{info.name}-{dtype_ids(dtypes)}-{shape}-{layout}-{mode}")
            else:
                for cols in ROW_COLS:
                    yield pytest.param(info, dtypes, cols, id=f"{info.name}-{dtype_ids(dtypes)}-{cols}")


def dtype_ids(dtypes):
    return "-".join(str(d)[6:] for d in dtypes)


@pytest.fixture
def emulated(cuda_executor):
    return EMULATED.ops()


def assert_near(actual, expected, dtype, what, scale=None):
    """actual within the registry's tolerance for `dtype` of `expected`,
    relative to the result's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=TOLERANCES[dtype]["atol"] * scale, rtol=0,
        msg=lambda m: f"{what}: {m}",
    )


def named_tensors(info, sample):
    """The sample's tensor arguments by the functional's parameter names."""
    bound = inspect.signature(info.op).bind(*sample.args, **sample.kwargs).arguments
    return {name: value for name, value in bound.items() if isinstance(value, torch.Tensor)}


def sample_for(info, dtypes, case):
    dtype, param_dtype = dtypes
    if info.name == "batch_norm":
        shape, layout, training = case
        return info.make_sample(shape, "cpu", dtype, layout=layout, param_dtype=param_dtype, training=training)
    return info.make_sample((rows_for(case), case), "cpu", dtype, param_dtype=param_dtype)


def reduced_count(info, sample):
    """How many values a weight gradient sums: its error grows with the square root."""
    x = sample.input
    return x.numel() // max(1, x.shape[1] if info.name == "batch_norm" else x.shape[-1])


@pytest.mark.parametrize("info, dtypes, case", kernel_cases())
def test_kernels_match_the_cpu_kernels_and_float64(emulated, info, dtypes, case):
    dtype = dtypes[0]
    sample = sample_for(info, dtypes, case)
    ours = info.call_forward(emulated, sample)
    theirs = info.call_forward(CPU.ops(), sample)
    upcast = sample.upcast()
    leaves = named_tensors(info, upcast)
    differentiated = [name for name in info.backward_outputs if name in leaves]
    for name in differentiated:
        leaves[name].requires_grad_()
    reference = info.ref(*upcast.args, **upcast.kwargs)
    reference = reference if isinstance(reference, tuple) else (reference,)
    assert_near(ours[0], reference[0], dtype, "output vs float64")
    for index, (a, b) in enumerate(zip(ours, theirs)):
        what = f"forward output {index}"
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), what
        if info.name.startswith("fused_add") and index == 1:
            assert torch.equal(a, b), "the sum differs from torch's x + residual"
        else:
            assert_near(a, b, a.dtype if a.dtype in TOLERANCES else dtype, what)

    # Backward: every gradient against the CPU kernels' and float64 autograd's,
    # with grad_output in the output's layout.
    grad_output = torch.empty_like(ours[0]).copy_(make_tensor(ours[0].shape, dtype, scale=1.0, shift=0.0))
    mask = [True] * len(info.backward_outputs)
    grads = info.call_backward(emulated, sample, ours, grad_output, mask)
    cpu_grads = info.call_backward(CPU.ops(), sample, theirs, grad_output, mask)
    reference_grads = dict(zip(
        differentiated,
        torch.autograd.grad(reference[0], [leaves[name] for name in differentiated], grad_output.double()),
    ))
    count = reduced_count(info, sample)
    for name, a, b in zip(info.backward_outputs, grads, cpu_grads):
        if name not in leaves:
            assert a.numel() == 0 and b.numel() == 0, f"grad_{name} of an absent argument"
            continue
        expected = reference_grads[name]
        scale = max(1.0, expected.abs().max().item()) * (1.0 if name == "input" else count**0.5)
        assert a.dtype == b.dtype and a.shape == b.shape, f"grad_{name}"
        assert_near(a, expected, dtype, f"grad_{name} vs float64", scale=scale)
        assert_near(a, b, dtype, f"grad_{name} vs the CPU kernels", scale=2 * scale)


ROW_OPS = [info for info in OP_DB if info.name != "batch_norm"]


def compare_with_cpu(emulated, info, sample, mask):
    """Forward and backward (gradients in `mask`) of the emulated kernels
    against the CPU kernels: same shapes, dtypes and strides (empty where a
    gradient is not asked for or its argument absent), values to tolerance."""
    dtype = sample.input.dtype
    ours = info.call_forward(emulated, sample)
    theirs = info.call_forward(CPU.ops(), sample)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), f"forward output {index}"
        assert_near(a, b, a.dtype if a.dtype in TOLERANCES else dtype, f"forward output {index}")
    grad_output = make_tensor(ours[0].shape, dtype, scale=1.0, shift=0.0)
    grads = info.call_backward(emulated, sample, ours, grad_output, mask)
    cpu_grads = info.call_backward(CPU.ops(), sample, theirs, grad_output, mask)
    for name, a, b in zip(info.backward_outputs, grads, cpu_grads):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), f"grad_{name}"
        scale = 2 * max(1.0, b.abs().max().item() if b.numel() else 1.0) * reduced_count(info, sample) ** 0.5
        assert_near(a, b, dtype, f"grad_{name}", scale=scale)
    return ours, grads


@pytest.mark.parametrize("cols", [7, 1024, 4097])
@pytest.mark.parametrize(
    "info, affine",
    [pytest.param(info, affine, id=f"{info.name}-{affine}") for info in ROW_OPS
     for affine in ("none", "weight", "bias") if affine != "bias" or "bias" in info.backward_outputs],
)
def test_partial_parameters_and_output_masks(emulated, info, affine, cols):
    sample = info.make_sample((9, cols), "cpu", torch.float32, affine=affine)
    mask = [name != "weight" for name in info.backward_outputs]
    _, grads = compare_with_cpu(emulated, info, sample, mask)
    assert grads[1].numel() == 0, "grad_weight was not asked for"


@pytest.mark.parametrize("shape, layout", [((0, 5, 33), "contiguous"), ((12, 40), "transposed"), ((7, 130), "strided")])
@pytest.mark.parametrize("info", ROW_OPS, ids=lambda info: info.name)
def test_zero_rows_and_non_contiguous_input(emulated, info, shape, layout):
    sample = info.make_sample(shape, "cpu", torch.float32, layout=layout)
    compare_with_cpu(emulated, info, sample, [True] * len(info.backward_outputs))


@pytest.mark.parametrize("cols", [1000, 4096, 65536])
def test_row_norm_stats_of_rows_with_a_large_mean(emulated, cols):
    """mean 1e4, spread 1: as exact as the CPU kernels, whose error is the
    float32 rounding of the mean itself (half an ulp of 1e4)."""
    x = (torch.randn(3, cols, dtype=torch.float64) + 1e4).float()
    reference = F.layer_norm(x.double(), [cols], eps=1e-5)
    error = (emulated.layer_norm_forward(x, [cols], None, None, 1e-5)[0].double() - reference).abs().max().item()
    cpu_error = (CPU.ops().layer_norm_forward(x, [cols], None, None, 1e-5)[0].double() - reference).abs().max().item()
    assert error <= 1.25 * cpu_error + 1e-6, (error, cpu_error)


@pytest.mark.parametrize("shape, layout", [((4, 3, 40, 40), "contiguous"), ((16, 8, 16, 16), "channels_last"), ((5000, 6), "contiguous")])
def test_batch_norm_stats_of_channels_with_a_large_mean(emulated, shape, layout):
    """mean 1e4, spread 1 in float32: as exact as the CPU kernels, whose error
    is the float32 rounding of the mean itself."""
    x = make_tensor(shape, torch.float64, layout=layout, scale=1.0, shift=1e4).float()
    reference = F.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    error = (emulated.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0].double() - reference).abs().max()
    cpu_error = (CPU.ops().batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0].double() - reference).abs().max()
    assert error <= 1.25 * cpu_error + 1e-6, (error.item(), cpu_error.item())


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (3, 4, 0, 5)])
def test_batch_norm_empty_batch_leaves_running_stats(emulated, shape):
    x = torch.empty(shape)
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    out = emulated.batch_norm_forward(x, None, None, running_mean, running_var, True, 0.1, 1e-5)
    cpu = CPU.ops().batch_norm_forward(x, None, None, running_mean, running_var, True, 0.1, 1e-5)
    for ours, theirs in zip(out, cpu):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_one_dim_empty_input_matches_the_cpu_op(emulated, training):
    """A 1-D input (0,) has no channels: every output and gradient is empty,
    shaped as the CPU op's."""
    x, running_mean, running_var = torch.empty(0), torch.empty(0), torch.empty(0)
    out = emulated.batch_norm_forward(x, None, None, running_mean, running_var, training, 0.1, 1e-5)
    cpu = CPU.ops().batch_norm_forward(x, None, None, running_mean, running_var, training, 0.1, 1e-5)
    grads = emulated.batch_norm_backward(torch.empty(0), x, None, None, out[1], out[2], training, [True, True, True])
    cpu_grads = CPU.ops().batch_norm_backward(torch.empty(0), x, None, None, cpu[1], cpu[2], training, [True, True, True])
    for ours, theirs in zip(out + grads, cpu + cpu_grads):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert out[0].shape == grads[0].shape == (0,)


def test_batch_norm_without_parameters_or_running_stats(emulated):
    x = make_tensor((6, 5, 7), torch.float32)
    out = emulated.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert_near(out[0], F.batch_norm(x.double(), None, None, training=True), torch.float32, "output")
    assert out[3].numel() == 0 and out[4].numel() == 0
    grads = emulated.batch_norm_backward(torch.ones_like(x), x, None, None, out[1], out[2], True, [True, False, False])
    assert_near(grads[0], torch.zeros_like(x, dtype=torch.float64), torch.float32, "grad_input of a constant gradient")
    assert grads[1].numel() == 0 and grads[2].numel() == 0


def row_norm_call(norm, x, weight, bias, eps=1e-5):
    """The plain forward op's arguments for `norm` (rms_norm has no bias)."""
    shape = [x.shape[-1]]
    return (x, shape, weight, bias, eps) if norm == "layer_norm" else (x, shape, weight, eps)


def fused_add_call(norm, x, residual, weight, bias, eps=1e-5):
    """The fused residual-add forward op's arguments for `norm` (rms_norm has no bias)."""
    shape = [x.shape[-1]]
    if norm == "layer_norm":
        return (x, residual, shape, weight, bias, eps)
    return (x, residual, shape, weight, eps)


def misaligned_copy(t):
    """t's values, contiguous, one element off 16-byte alignment (the scalar path)."""
    return torch.empty(1 + t.numel(), dtype=t.dtype)[1:].view(t.shape).copy_(t)


def check_fused_add(emulated, norm, x, residual, weight, bias, dtype, misaligned=False):
    """The fused op's sum is torch's x + residual to the bit; its norm and
    statistics are the plain kernel's on that sum to the bit (one template, and
    the same mapping: a misaligned addend takes the scalar path, as does a
    misaligned sum); every output has the CPU op's shape, dtype and strides,
    and values near the CPU op's."""
    args = fused_add_call(norm, x, residual, weight, bias)
    fused = getattr(emulated, f"fused_add_{norm}_forward")(*args)
    cpu = getattr(CPU.ops(), f"fused_add_{norm}_forward")(*args)
    total = x + residual
    plain_input = misaligned_copy(total) if misaligned else total
    plain = getattr(emulated, f"{norm}_forward")(*row_norm_call(norm, plain_input, weight, bias))
    plain = (plain[0].contiguous(), total, *plain[1:])
    names = ("output", "sum", "mean", "rstd") if norm == "layer_norm" else ("output", "sum", "rstd")
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, ours, on_sum, theirs in zip(names, fused, plain, cpu):
        assert (ours.shape, ours.dtype, ours.stride()) == (theirs.shape, theirs.dtype, theirs.stride()), name
        assert torch.equal(ours, on_sum), f"{name} differs from the plain kernel's on the sum"
        if name == "sum":
            assert torch.equal(theirs, total)
        else:
            assert_near(ours, theirs, dtype if name == "output" else stats_dtype, name)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_fused_add_zero_rows_strided_and_misaligned_input(emulated, norm):
    empty = make_tensor((0, 5, 33), torch.float32)
    out = getattr(emulated, f"fused_add_{norm}_forward")(*fused_add_call(norm, empty, empty, None, None))
    assert out[0].shape == out[1].shape == (0, 5, 33) and all(t.numel() == 0 for t in out)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # A strided input and a residual off 16-byte alignment: the glue makes
        # the input contiguous, the residual takes the scalar path.
        x = make_tensor((6, 40, 256), dtype).transpose(0, 1)[:, ::2]
        residual = misaligned_copy(make_tensor(x.shape, dtype, scale=1.0, shift=0.0))
        weight = make_tensor((256,), dtype, scale=1.0, shift=0.0)
        bias = weight if norm == "layer_norm" else None
        check_fused_add(emulated, norm, x, residual, weight, bias, dtype, misaligned=True)


def test_fused_add_argument_errors_match_the_cpu_op(emulated):
    x = make_tensor((3, 8), torch.float32)
    for bad in (make_tensor((3, 7), torch.float32), make_tensor((3, 8), torch.float64)):
        for op in ("fused_add_layer_norm_forward", "fused_add_rms_norm_forward"):
            messages = []
            for namespace in (emulated, CPU.ops()):
                args = (x, bad, [8], None, None, 1e-5) if "layer" in op else (x, bad, [8], None, 1e-5)
                with pytest.raises(RuntimeError) as error:
                    getattr(namespace, op)(*args)
                messages.append(str(error.value).splitlines()[0])
            assert messages[0] == messages[1]

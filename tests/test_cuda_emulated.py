"""Every CUDA kernel, run on the CPU executor (tests/cuda_emulator) through the
CUDA glue (torch.ops.layernorm_ext_cuda_emulated), against the CPU kernels and
float64 torch.

The shapes are chosen by the launch plans of csrc/cuda: row lengths that take
the warp path at every lane-pack count, the cached block path and the long-row
path, vectorized and scalar; BatchNorm shapes that take the NCHW reduction
with short and long runs and the channels-last one, with one and several
splits per channel, and vectorized and scalar elementwise sweeps. The session
reports which of the instantiated kernels ran (`.ci/run` requires all).
Every emulated op call runs under both thread schedules and fails unless they
agree to the bit (emulated_ops.cpp).
"""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext  # noqa: F401 - registers torch.ops.layernorm_ext (the CPU kernels)

pytestmark = pytest.mark.cuda_emulated

CPU = torch.ops.layernorm_ext

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
# Error against the float64 reference, relative to the result's scale.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def ids(value):
    if isinstance(value, tuple) and all(isinstance(v, torch.dtype) for v in value):
        return "-".join(str(v)[6:] for v in value)
    return str(value)


@pytest.fixture
def emulated(cuda_executor):
    return torch.ops.layernorm_ext_cuda_emulated


def random(shape, dtype, scale=3.0, shift=1.0):
    return torch.randn(shape, dtype=torch.float64).mul(scale).add(shift).to(dtype)


def assert_near(actual, reference, dtype, what, scale=None):
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    if scale is None:
        scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), reference.double(), atol=TOLERANCE[dtype] * scale, rtol=0, msg=lambda m: f"{what}: {m}"
    )


def rows_for(cols):
    """Enough rows for several blocks (and grid-stride steps) on short rows, few on long ones."""
    return max(2, min(300, 40000 // cols))


def row_norm_call(norm, x, weight, bias, eps=1e-5):
    """The forward op's arguments for `norm` (rms_norm has no bias)."""
    shape = [x.shape[-1]]
    if norm == "layer_norm":
        return (x, shape, weight, bias, eps)
    return (x, shape, weight, eps)


def row_norm_reference(norm, x, weight, bias, eps=1e-5):
    shape = [x.shape[-1]]
    up = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    if norm == "layer_norm":
        y = F.layer_norm(up[0], shape, up[1], up[2], eps)
    else:
        y = F.rms_norm(up[0], shape, up[1], eps)
    return y, up


@pytest.mark.parametrize("cols", ROW_COLS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=ids)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norm_kernels(emulated, norm, dtypes, cols):
    dtype, param_dtype = dtypes
    rows = rows_for(cols)
    x = random((rows, cols), dtype)
    weight = random((cols,), param_dtype, 1.0, 0.0)
    bias = random((cols,), param_dtype, 1.0, 0.0) if norm == "layer_norm" else None
    args = row_norm_call(norm, x, weight, bias)
    forward = getattr(emulated, f"{norm}_forward")(*args)
    cpu_forward = getattr(CPU, f"{norm}_forward")(*args)
    reference, upcast = row_norm_reference(norm, x, weight, bias)
    assert forward[0].dtype == dtype
    assert_near(forward[0], reference, dtype, "output")
    # Statistics in the accumulation type: the CPU kernels' to its rounding.
    for name, ours, cpu in zip(("mean", "rstd") if norm == "layer_norm" else ("rstd",), forward[1:], cpu_forward[1:]):
        assert ours.dtype == cpu.dtype
        assert_near(ours, cpu, torch.float64 if dtype == torch.float64 else torch.float32, name)

    grad_output = random((rows, cols), dtype, 1.0, 0.0)
    reference.backward(grad_output.double())
    saved = forward[1:]
    if norm == "layer_norm":
        grads = emulated.layer_norm_backward(grad_output, x, [cols], *saved, weight, bias, [True, True, True])
        expected = (upcast[0].grad, upcast[1].grad, upcast[2].grad)
    else:
        grads = emulated.rms_norm_backward(grad_output, x, [cols], *saved, weight, [True, True])
        expected = (upcast[0].grad, upcast[1].grad)
    for name, ours, ref in zip(("grad_input", "grad_weight", "grad_bias"), grads, expected):
        # Parameter gradients sum over rows: their error grows with sqrt(rows).
        scale_rows = 1.0 if name == "grad_input" else rows**0.5
        assert ours.dtype == (dtype if name == "grad_input" else param_dtype)
        assert_near(ours, ref, dtype, name, scale=max(1.0, ref.abs().max().item()) * scale_rows)


@pytest.mark.parametrize(
    "norm, affine", [("layer_norm", "none"), ("layer_norm", "weight"), ("layer_norm", "bias"), ("rms_norm", "none")]
)
@pytest.mark.parametrize("cols", [7, 1024, 4097])
def test_row_norm_without_parameters_and_partial_masks(emulated, norm, affine, cols):
    x = random((9, cols), torch.float32)
    weight = random((cols,), torch.float32) if affine == "weight" else None
    bias = random((cols,), torch.float32) if affine == "bias" else None
    args = row_norm_call(norm, x, weight, bias)
    forward = getattr(emulated, f"{norm}_forward")(*args)
    reference, upcast = row_norm_reference(norm, x, weight, bias)
    assert_near(forward[0], reference, torch.float32, "output")
    grad_output = random((9, cols), torch.float32, 1.0, 0.0)
    reference.backward(grad_output.double())
    if norm == "layer_norm":
        grad_input, grad_weight, grad_bias = emulated.layer_norm_backward(
            grad_output, x, [cols], *forward[1:], weight, bias, [True, False, True]
        )
        assert grad_weight.numel() == 0
        if bias is not None:
            assert_near(grad_bias, upcast[2].grad, torch.float32, "grad_bias", scale=3.0 * max(1.0, upcast[2].grad.abs().max().item()))
        else:
            assert grad_bias.numel() == 0
    else:
        grad_input, grad_weight = emulated.rms_norm_backward(grad_output, x, [cols], *forward[1:], weight, [True, False])
        assert grad_weight.numel() == 0
    assert_near(grad_input, upcast[0].grad, torch.float32, "grad_input")


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_row_norm_zero_rows_and_strided_input(emulated, norm):
    empty = random((0, 5, 33), torch.float32)
    out = getattr(emulated, f"{norm}_forward")(*row_norm_call(norm, empty, None, None))
    assert out[0].shape == (0, 5, 33) and all(t.numel() == 0 for t in out)
    # A transposed view: the glue makes it contiguous for the kernels.
    x = random((40, 12), torch.float32).t()
    weight = random((40,), torch.float32)
    y = getattr(emulated, f"{norm}_forward")(*row_norm_call(norm, x, weight, None))[0]
    reference, _ = row_norm_reference(norm, x, weight, None)
    assert_near(y, reference, torch.float32, "output of a transposed input")


@pytest.mark.parametrize("cols", [1000, 4096, 65536])
def test_row_norm_stats_of_rows_with_a_large_mean(emulated, cols):
    """mean 1e4, spread 1: as exact as the CPU kernels, whose error is the
    float32 rounding of the mean itself (half an ulp of 1e4)."""
    x = (torch.randn(3, cols, dtype=torch.float64) + 1e4).float()
    reference = F.layer_norm(x.double(), [cols], eps=1e-5)
    error = (emulated.layer_norm_forward(x, [cols], None, None, 1e-5)[0].double() - reference).abs().max().item()
    cpu_error = (CPU.layer_norm_forward(x, [cols], None, None, 1e-5)[0].double() - reference).abs().max().item()
    assert error <= 1.25 * cpu_error + 1e-6, (error, cpu_error)


# BatchNorm: (shape, channels_last). NCHW runs of 33 and 7 (short: one value a
# thread across samples) and 256 or 1600 (long: a run at a time); 4800 values
# a channel split in two; 2-D inputs and channels-last take the tile
# reduction; C or inner divisible by the pack width take 16-byte sweeps, odd
# ones (33, 7x9, C = 5) one element at a time.
BATCH_NORM_SHAPES = [
    ((64, 24), False),
    ((300, 10), False),
    ((4, 6, 33), False),
    ((8, 16, 16, 16), False),
    ((3, 5, 40, 40), False),
    ((2, 3, 4, 5, 7), False),
    ((8, 16, 16, 16), True),
    ((4, 5, 7, 9), True),
    ((16, 40, 32, 32), True),
    ((2, 8, 3, 5, 6), True),
]
BATCH_NORM_DTYPES = DTYPE_PAIRS


def memory_format_of(x):
    """The channels-last format of x's rank."""
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def batch_norm_input(shape, channels_last, dtype):
    x = random(shape, dtype, 2.0, 0.5)
    return x.contiguous(memory_format=memory_format_of(x)) if channels_last else x


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("dtypes", BATCH_NORM_DTYPES, ids=ids)
@pytest.mark.parametrize("shape, channels_last", BATCH_NORM_SHAPES, ids=ids)
def test_batch_norm_kernels(emulated, shape, channels_last, dtypes, training):
    dtype, param_dtype = dtypes
    channels = shape[1]
    x = batch_norm_input(shape, channels_last, dtype)
    weight = random((channels,), param_dtype, 0.5, 1.0)
    bias = random((channels,), param_dtype, 1.0, 0.0)
    running_mean = random((channels,), param_dtype, 1.0, 0.0)
    running_var = random((channels,), param_dtype, 0.5, 0.0).abs().add(0.5).to(param_dtype)
    args = (x, weight, bias, running_mean, running_var, training, 0.1, 1e-5)
    out = emulated.batch_norm_forward(*args)
    cpu = CPU.batch_norm_forward(*args)
    up = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref_mean, ref_var = running_mean.double(), running_var.double()
    reference = F.batch_norm(up[0], ref_mean, ref_var, up[1], up[2], training, 0.1, 1e-5)
    assert out[0].dtype == dtype and out[0].is_contiguous(memory_format=torch.channels_last) == cpu[0].is_contiguous(
        memory_format=torch.channels_last
    )
    assert_near(out[0], reference, dtype, "output")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, ours, theirs in zip(("save_mean", "save_rstd", "new_running_mean", "new_running_var"), out[1:], cpu[1:]):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        assert_near(ours, theirs, acc if ours.dtype == acc else param_dtype, name)
    if training:
        assert_near(out[3], ref_mean, param_dtype, "new_running_mean vs torch")
        assert_near(out[4], ref_var, param_dtype, "new_running_var vs torch")

    grad_output = random(shape, dtype, 1.0, 0.0)
    if channels_last:
        grad_output = grad_output.contiguous(memory_format=memory_format_of(x))
    reference.backward(grad_output.double())
    grads = emulated.batch_norm_backward(grad_output, x, weight, bias, out[1], out[2], training, [True, True, True])
    count = x.numel() // channels
    for name, ours, expected in zip(("grad_input", "grad_weight", "grad_bias"), grads, [u.grad for u in up]):
        scale = max(1.0, expected.abs().max().item()) * (1.0 if name == "grad_input" else count**0.5)
        assert ours.dtype == (dtype if name == "grad_input" else param_dtype), name
        assert_near(ours, expected, dtype, name, scale=scale)


@pytest.mark.parametrize("shape, channels_last", [((4, 3, 40, 40), False), ((16, 8, 16, 16), True), ((5000, 6), False)])
def test_batch_norm_stats_of_channels_with_a_large_mean(emulated, shape, channels_last):
    """mean 1e4, spread 1 in float32: as exact as the CPU kernels, whose error
    is the float32 rounding of the mean itself."""
    x = batch_norm_input(shape, channels_last, torch.float64).sub(0.5).div(2).add(1e4).float()
    if channels_last:
        x = x.contiguous(memory_format=memory_format_of(x))
    reference = F.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    error = (emulated.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0].double() - reference).abs().max()
    cpu_error = (CPU.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0].double() - reference).abs().max()
    assert error <= 1.25 * cpu_error + 1e-6, (error.item(), cpu_error.item())


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (3, 4, 0, 5)])
def test_batch_norm_empty_batch_leaves_running_stats(emulated, shape):
    x = torch.empty(shape)
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    out = emulated.batch_norm_forward(x, None, None, running_mean, running_var, True, 0.1, 1e-5)
    cpu = CPU.batch_norm_forward(x, None, None, running_mean, running_var, True, 0.1, 1e-5)
    for ours, theirs in zip(out, cpu):
        assert torch.equal(ours, theirs)


def test_batch_norm_without_parameters_or_running_stats(emulated):
    x = random((6, 5, 7), torch.float32)
    out = emulated.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert_near(out[0], F.batch_norm(x.double(), None, None, training=True), torch.float32, "output")
    assert out[3].numel() == 0 and out[4].numel() == 0
    grads = emulated.batch_norm_backward(torch.ones_like(x), x, None, None, out[1], out[2], True, [True, False, False])
    assert_near(grads[0], torch.zeros_like(x, dtype=torch.float64), torch.float32, "grad_input of a constant gradient")
    assert grads[1].numel() == 0 and grads[2].numel() == 0


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
    cpu = getattr(CPU, f"fused_add_{norm}_forward")(*args)
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


@pytest.mark.parametrize("cols", ROW_COLS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=ids)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_fused_add_kernels(emulated, norm, dtypes, cols):
    """The fused residual-add forward kernels on every mapping (ROW_COLS), with
    and without affine parameters."""
    dtype, param_dtype = dtypes
    rows = rows_for(cols)
    x = random((rows, cols), dtype)
    residual = random((rows, cols), dtype, 1.0, 0.0)
    weight = random((cols,), param_dtype, 1.0, 0.0)
    bias = random((cols,), param_dtype, 1.0, 0.0) if norm == "layer_norm" else None
    check_fused_add(emulated, norm, x, residual, weight, bias, dtype)
    check_fused_add(emulated, norm, x, residual, None, None, dtype)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_fused_add_zero_rows_strided_and_misaligned_input(emulated, norm):
    empty = random((0, 5, 33), torch.float32)
    out = getattr(emulated, f"fused_add_{norm}_forward")(*fused_add_call(norm, empty, empty, None, None))
    assert out[0].shape == out[1].shape == (0, 5, 33) and all(t.numel() == 0 for t in out)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # A strided input and a residual off 16-byte alignment: the glue makes
        # the input contiguous, the residual takes the scalar path.
        x = random((6, 40, 256), dtype).transpose(0, 1)[:, ::2]
        residual = misaligned_copy(random(x.shape, dtype, 1.0, 0.0))
        weight = random((256,), dtype, 1.0, 0.0)
        bias = weight if norm == "layer_norm" else None
        check_fused_add(emulated, norm, x, residual, weight, bias, dtype, misaligned=True)


def test_fused_add_argument_errors_match_the_cpu_op(emulated):
    x = random((3, 8), torch.float32)
    for bad in (random((3, 7), torch.float32), random((3, 8), torch.float64)):
        for op in ("fused_add_layer_norm_forward", "fused_add_rms_norm_forward"):
            messages = []
            for namespace in (emulated, CPU):
                args = (x, bad, [8], None, None, 1e-5) if "layer" in op else (x, bad, [8], None, 1e-5)
                with pytest.raises(RuntimeError) as error:
                    getattr(namespace, op)(*args)
                messages.append(str(error.value).splitlines()[0])
            assert messages[0] == messages[1]

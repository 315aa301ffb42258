"""What the CUDA kernels need a device for: streams, a second device, more
than 2^31 elements, the torch glue (device guard, statistics, empty
batches, torch.compile, transforms), agreement with the CPU kernels,
the misaligned-row path. Their float64 parity over the registry's samples
is test_float64_reference.py's, gradcheck test_gradcheck.py's, opcheck
test_opcheck.py's (each on the cuda backend).

Runs only where a GPU is usable and the extension was built with its CUDA
kernels; elsewhere every test is skipped with the reason.
"""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext.op_db import DTYPES

_ops = torch.ops.layernorm_ext

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and layernorm_ext.build_info()["cuda"]),
    reason="needs a CUDA GPU and layernorm_ext built with its CUDA kernels "
    f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
    f"build_info()['cuda']={layernorm_ext.build_info()['cuda']})",
)

# ||out - ref|| / ||ref|| allowed per dtype (fp32 accumulation for 16-bit types).
TOL = {
    torch.float32: 1e-5,
    torch.float64: 1e-13,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}


def poison_allocator(device="cuda", nbytes=1 << 28):
    """Fills cached device memory with NaN, so an output element that a kernel
    forgets to write shows up as NaN rather than as a stale plausible value."""
    torch.cuda.synchronize(device)
    free = torch.cuda.mem_get_info(device)[0]
    junk = torch.full((min(nbytes, free // 4) // 4,), float("nan"), device=device)
    del junk


def param_dtypes(dtype):
    """The parameter dtypes the kernels take with `dtype` input."""
    return [dtype, torch.float32] if dtype in (torch.float16, torch.bfloat16) else [dtype]


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(out, ref, dtype, what=""):
    assert out.shape == ref.shape, (
        f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    )
    err = rel_err(out, ref)
    assert err <= TOL[dtype], (
        f"{what}: relative error {err:.3e} > {TOL[dtype]:.1e} ({dtype})"
    )


def rows_for(cols):
    return 37 if cols <= 4096 else 3


def row_case(dtype, param_dtype, cols, batch=None, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed + cols)
    batch = batch or (rows_for(cols),)
    x = torch.randn(*batch, cols, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(cols, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(cols, generator=g, dtype=torch.float64) if affine else None
    dy = torch.randn(*batch, cols, generator=g, dtype=torch.float64)
    cast = lambda t, d: None if t is None else t.to(d).cuda()
    return cast(x, dtype), cast(w, param_dtype), cast(b, param_dtype), cast(dy, dtype)


def reference_row_norm(kind, x, w, b, dy, eps):
    """float64 forward and gradients of the same (rounded) inputs."""
    x64 = x.double().requires_grad_()
    w64 = None if w is None else w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    shape = [x.shape[-1]]
    if kind == "layer_norm":
        y = F.layer_norm(x64, shape, w64, b64, eps)
    else:
        y = F.rms_norm(x64, shape, w64, eps)
    inputs = [
        t for t in (x64, w64, b64 if kind == "layer_norm" else None) if t is not None
    ]
    grads = torch.autograd.grad(y, inputs, dy.double())
    return y.detach(), grads


def run_row_norm(kind, x, w, b, dy, eps, mask=(True, True, True)):
    shape = [x.shape[-1]]
    if kind == "layer_norm":
        y, mean, rstd = _ops.layer_norm_forward(x, shape, w, b, eps)
        grads = _ops.layer_norm_backward(dy, x, shape, mean, rstd, w, b, list(mask))
        return y, (mean, rstd), grads
    y, rstd = _ops.rms_norm_forward(x, shape, w, eps)
    grads = _ops.rms_norm_backward(dy, x, shape, rstd, w, list(mask[:2]))
    return y, (rstd,), grads


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_row_norm_statistics(kind):
    x, w, b, _ = row_case(torch.float32, torch.float32, 1000)
    x = (
        x + 1000.0
    )  # a large mean against a unit spread: a naive E[x^2] - E[x]^2 loses it
    x64 = x.double()
    if kind == "layer_norm":
        _, mean, rstd = _ops.layer_norm_forward(x, [1000], w, b, 1e-5)
        torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=1e-6)
        ref_rstd = (x64.var(-1, unbiased=False) + 1e-5).rsqrt()
    else:
        _, rstd = _ops.rms_norm_forward(x, [1000], w, 1e-5)
        ref_rstd = (x64.pow(2).mean(-1) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("cols", [7, 1000, 4096])
def test_cpu_and_cuda_agree(kind, cols):
    x, w, b, dy = row_case(torch.float32, torch.float32, cols, batch=(5, 9))
    cuda_y, cuda_stats, cuda_grads = run_row_norm(kind, x, w, b, dy, 1e-5)
    cpu = [None if t is None else t.cpu() for t in (x, w, b, dy)]
    cpu_y, cpu_stats, cpu_grads = run_row_norm(kind, *cpu, 1e-5)
    for out, ref in zip(
        (cuda_y, *cuda_stats, *cuda_grads), (cpu_y, *cpu_stats, *cpu_grads)
    ):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_misaligned_rows_take_the_scalar_path(kind):
    # An odd element offset breaks 16-byte alignment of every row.
    storage = torch.randn(1 + 64 * 256, device="cuda")
    x = storage[1:].view(64, 256)
    w = torch.randn(256, device="cuda")
    fn = layernorm_ext.layer_norm if kind == "layer_norm" else layernorm_ext.rms_norm
    ref_fn = F.layer_norm if kind == "layer_norm" else F.rms_norm
    assert_close_rel(
        fn(x, [256], w),
        ref_fn(x.double(), [256], w.double()),
        torch.float32,
        "misaligned",
    )


def test_zero_rows():
    x = torch.randn(0, 64, device="cuda")
    y, mean, rstd = _ops.layer_norm_forward(x, [64], None, None, 1e-5)
    assert y.shape == (0, 64) and mean.shape == (0,) and rstd.shape == (0,)
    w = torch.randn(64, device="cuda")
    dx, dw, db = _ops.layer_norm_backward(
        x, x, [64], mean, rstd, w, w, [True, True, True]
    )
    assert dx.shape == (0, 64)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(w))


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_backward_is_deterministic(kind):
    x, w, b, dy = row_case(torch.float32, torch.float32, 1024, batch=(4096,))
    first = run_row_norm(kind, x, w, b, dy, 1e-5)[2]
    second = run_row_norm(kind, x, w, b, dy, 1e-5)[2]
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_second_stream(kind):
    x, w, b, dy = row_case(torch.float32, torch.float32, 4096, batch=(256,))
    expected = run_row_norm(kind, x, w, b, dy, 1e-5)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # The op's input is only filled after a long sleep queued on this
        # stream: an op that ran on another stream would read the zeros.
        x2 = torch.zeros_like(x)
        torch.cuda._sleep(50_000_000)
        x2.copy_(x)
        got = run_row_norm(kind, x2, w, b, dy, 1e-5)
    stream.synchronize()
    for out, ref in zip((got[0], *got[2]), (expected[0], *expected[2])):
        assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU (cuda:1)")
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "batch_norm"])
def test_second_device(kind):
    torch.cuda.set_device(0)
    x = torch.randn(8, 16, 5, 5)
    w, b = torch.randn(16), torch.randn(16)
    if kind == "batch_norm":
        ref = _ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)[0]
        got = _ops.batch_norm_forward(
            x.to("cuda:1"), w.to("cuda:1"), b.to("cuda:1"), None, None, True, 0.1, 1e-5
        )[0]
    else:
        x = x.reshape(8, 400)
        w, b = torch.randn(400), torch.randn(400)
        ref = run_row_norm(kind, x, w, b, x, 1e-5)[0]
        got = run_row_norm(
            kind, x.to("cuda:1"), w.to("cuda:1"), b.to("cuda:1"), x.to("cuda:1"), 1e-5
        )[0]
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), ref, rtol=2e-5, atol=2e-5)


def _free_bytes():
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_more_than_2_31_elements(kind):
    cols = 4096
    rows = 2**31 // cols + 3  # past 2^31 elements, so 32-bit offsets would wrap
    nbytes = rows * cols * 2
    if _free_bytes() < 5 * nbytes:  # x, dy, y, dx and slack, bfloat16
        pytest.skip(f"needs {5 * nbytes / 2**30:.1f} GiB free on the GPU")
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    y, _, grads = run_row_norm(kind, x, w, w, x, 1e-5, mask=(True, False, False))
    for rows_slice in (slice(0, 2), slice(rows - 2, rows)):
        ref_y, ref_grads = reference_row_norm(
            kind, x[rows_slice], w, w, x[rows_slice], 1e-5
        )
        assert_close_rel(
            y[rows_slice], ref_y, torch.bfloat16, "rows past 2^31 elements"
        )
        assert_close_rel(
            grads[0][rows_slice], ref_grads[0], torch.bfloat16, "grad past 2^31"
        )


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_compile_fullgraph(kind):
    x = torch.randn(8, 3, 256, device="cuda", requires_grad=True)
    w = torch.randn(256, device="cuda", requires_grad=True)
    if kind == "layer_norm":
        fn = lambda x, w: layernorm_ext.layer_norm(x, [256], w, None).sum()
    else:
        fn = lambda x, w: layernorm_ext.rms_norm(x, [256], w).sum()
    eager_grads = torch.autograd.grad(fn(x, w), (x, w))
    compiled = torch.compile(fn, fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(x, w), (x, w))
    for got, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, ref)


# ------------------------------------------------------- fused residual add

FUSED_KINDS = ["fused_add_layer_norm", "fused_add_rms_norm"]
# Every mapping: warp path with several rows a warp and whole-warp rows, the
# cached block path and the long-row path past the cache.
FUSED_COLS = [1, 7, 31, 32, 33, 1000, 1024, 4096, 4097, 65537]


def run_fused(kind, x, r, w, b, eps):
    """The fused op's outputs, and the plain op's on the separate sum x + r."""
    shape = [x.shape[-1]]
    if kind == "fused_add_layer_norm":
        y, s, mean, rstd = _ops.fused_add_layer_norm_forward(x, r, shape, w, b, eps)
        plain_y, plain_mean, plain_rstd = _ops.layer_norm_forward(x + r, shape, w, b, eps)
        return (y, s, mean, rstd), (plain_y, x + r, plain_mean, plain_rstd)
    y, s, rstd = _ops.fused_add_rms_norm_forward(x, r, shape, w, eps)
    plain_y, plain_rstd = _ops.rms_norm_forward(x + r, shape, w, eps)
    return (y, s, rstd), (plain_y.contiguous(), x + r, plain_rstd)


@pytest.mark.parametrize("kind", FUSED_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", FUSED_COLS)
def test_fused_add_matches_plain_op_on_the_sum(kind, dtype, cols):
    """The sum is torch's x + r to the bit, and the norm is the plain kernel's
    on that sum to the bit (the same template on the same mapping)."""
    for param_dtype in param_dtypes(dtype):
        for affine in (True, False):
            x, w, b, r = row_case(dtype, param_dtype, cols, affine=affine)
            poison_allocator()
            fused, plain = run_fused(kind, x, r, w, b, 1e-5)
            what = f"{kind} cols={cols} param={param_dtype} affine={affine}"
            for index, (got, ref) in enumerate(zip(fused, plain)):
                assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what} #{index}"
                assert got.is_contiguous(), f"{what} #{index}"
                assert torch.equal(got, ref), f"{what} #{index}"


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_add_cpu_and_cuda_agree(kind):
    x, w, b, r = row_case(torch.float32, torch.float32, 1000, batch=(5, 9))
    cuda_out = run_fused(kind, x, r, w, b, 1e-5)[0]
    cpu_out = run_fused(kind, *(t.cpu() for t in (x, r, w, b)), 1e-5)[0]
    for got, ref in zip(cuda_out, cpu_out):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got.cpu(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_add_strided_misaligned_and_empty(kind):
    fn = getattr(layernorm_ext, kind)
    ref_fn = F.layer_norm if kind == "fused_add_layer_norm" else F.rms_norm
    # A strided input and a residual one element off 16-byte alignment (the
    # scalar path).
    x = torch.randn(6, 40, 256, device="cuda").transpose(0, 1)[:, ::2]
    r = torch.randn(1 + x.numel(), device="cuda")[1:].view(x.shape)
    w = torch.randn(256, device="cuda")
    y, s = fn(x, r, [256], w)
    assert torch.equal(s, x + r)
    assert_close_rel(y, ref_fn(s.double(), [256], w.double()), torch.float32, kind)
    empty = torch.randn(0, 64, device="cuda")
    y, s = fn(empty, empty, [64], None)
    assert y.shape == s.shape == (0, 64)


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_add_gradients(kind):
    x = torch.randn(4, 3, 17, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn(4, 3, 17, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = getattr(layernorm_ext, kind)
    assert torch.autograd.gradcheck(lambda x, r, w: fn(x, r, [17], w), (x, r, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_opcheck(dtype):
    """The CUDA outputs match the fake kernels (shapes, dtypes, strides) and autograd."""
    x = torch.randn(4, 6, 32, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(4, 6, 32, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(32, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(32, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(_ops.fused_add_layer_norm_forward.default, (x, r, [32], w, b, 1e-5))
    torch.library.opcheck(_ops.fused_add_rms_norm_forward.default, (x, r, [32], w, 1e-6))


# ----------------------------------------------------------------- BatchNorm

BN_SHAPES = [(16, 8), (4, 6, 33), (8, 16, 7, 9), (2, 4, 3, 5, 6), (3, 64, 32, 32)]


def bn_input(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype).cuda()
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif channels_last and len(shape) == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def test_batch_norm_cpu_and_cuda_agree():
    x = bn_input((8, 16, 7, 9), torch.float32, False)
    args = (torch.randn(16), torch.randn(16), torch.randn(16), torch.rand(16) + 0.5)
    cuda_out = _ops.batch_norm_forward(x, *(a.cuda() for a in args), True, 0.1, 1e-5)
    cpu_out = _ops.batch_norm_forward(x.cpu(), *args, True, 0.1, 1e-5)
    for got, ref in zip(cuda_out, cpu_out):
        torch.testing.assert_close(got.cpu(), ref, rtol=2e-5, atol=2e-5)


# (0, 16) takes the channels-last kernels (one value per sample and channel).
@pytest.mark.parametrize("shape", [(0, 16), (0, 16, 7), (8, 16, 0), (0, 16, 5, 3), (4, 16, 0, 3)])
def test_batch_norm_empty_batch_in_training_matches_cpu_and_torch(shape):
    """An empty batch normalizes nothing: mean 0, rstd 1 / sqrt(eps), and the
    running stats stay as they were (torch's BatchNorm leaves them too)."""
    x = torch.randn(shape)
    args = (torch.randn(16), torch.randn(16), torch.randn(16), torch.rand(16) + 0.5)
    cuda_out = _ops.batch_norm_forward(x.cuda(), *(a.cuda() for a in args), True, 0.1, 1e-5)
    cpu_out = _ops.batch_norm_forward(x, *args, True, 0.1, 1e-5)
    for got, ref in zip(cuda_out, cpu_out):
        assert got.shape == ref.shape
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-6, atol=0)
    rm, rv = args[2].clone(), args[3].clone()
    F.batch_norm(x, rm, rv, args[0], args[1], training=True)
    torch.testing.assert_close(cuda_out[3].cpu(), rm, rtol=0, atol=0)
    torch.testing.assert_close(cuda_out[4].cpu(), rv, rtol=0, atol=0)


def test_batch_norm_is_deterministic():
    x = bn_input((32, 64, 28, 28), torch.float32, True)
    dy = bn_input((32, 64, 28, 28), torch.float32, True, seed=2)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    runs = []
    for _ in range(2):
        out = _ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
        runs.append(
            (
                *out[:3],
                *_ops.batch_norm_backward(
                    dy, x, w, b, out[1], out[2], True, [True] * 3
                ),
            )
        )
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_batch_norm_more_than_2_31_elements():
    shape = (2**31 // (64 * 1024) + 1, 64, 32, 32)  # past 2^31 elements
    nbytes = 2 * torch.Size(shape).numel()
    if _free_bytes() < 2 * nbytes + (1 << 30):  # x, y (bfloat16) and slack
        pytest.skip(f"needs {(2 * nbytes + (1 << 30)) / 2**30:.1f} GiB free on the GPU")
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    y, mean, rstd, _, _ = _ops.batch_norm_forward(
        x, None, None, None, None, True, 0.1, 1e-5
    )
    x_last = x[-1].double()
    ref_last = (x_last - mean.double()[:, None, None]) * rstd.double()[:, None, None]
    assert_close_rel(y[-1], ref_last, torch.bfloat16, "batch_norm past 2^31 elements")
    # Chunked float64 sums: a float copy of x would not fit beside it.
    ref_mean = sum(
        x[i : i + 256].double().sum((0, 2, 3)) for i in range(0, shape[0], 256)
    )
    ref_mean = ref_mean / (shape[0] * shape[2] * shape[3])
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "batch_norm"])
def test_transforms_on_cuda_match_cpu(name):
    """Forward AD, torch.func.grad/vmap/hessian on CUDA tensors give the CPU's
    results (tests/test_transforms.py checks the CPU against torch)."""
    from torch.func import grad, hessian, jvp, vmap

    fn = {
        "layer_norm": lambda x, w: layernorm_ext.layer_norm(x, (5,), w, w.flip(0)),
        "rms_norm": lambda x, w: layernorm_ext.rms_norm(x, (5,), w),
        "batch_norm": lambda x, w: layernorm_ext.batch_norm(x, None, None, w, w.flip(0), True),
    }[name]
    loss = lambda x, w: fn(x, w).sin().sum()  # noqa: E731
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)
    dx = torch.randn(4, 5, dtype=torch.float64)
    batched = torch.randn(3, 4, 5, dtype=torch.float64)

    def results(device):
        args = (x.to(device), w.to(device))
        return (
            jvp(fn, args, (dx.to(device), torch.zeros_like(args[1])))[1],
            *grad(loss, (0, 1))(*args),
            vmap(fn, (0, None))(batched.to(device), args[1]),
            hessian(loss)(*args),
        )

    for got, ref in zip(results("cuda"), results("cpu")):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-9, atol=1e-10)

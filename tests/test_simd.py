"""The SIMD dispatch of the CPU kernels (row norms and BatchNorm): every
instruction set this CPU runs (AVX-512, AVX2, portable) is exercised and
checked against float64 references, bit-exact bfloat16/half rounding,
thread-count determinism, the streamed-output path, and the build_info /
LAYERNORM_EXT_SIMD controls."""

import ctypes
import functools
import mmap
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext import _loader
from child_python import run_python
from layernorm_ext.op_db import op_info

LEVELS = ["avx512", "avx2", "scalar"]
_C = _loader.ensure_loaded()


def _runnable_levels():
    """The levels this CPU supports: the default and every one below it."""
    best = LEVELS.index(_default_level())
    return LEVELS[best:]


@functools.lru_cache(maxsize=None)
def _default_level():
    """The level a fresh process picks with no LAYERNORM_EXT_SIMD."""
    result = run_python(
        ["-c", "import layernorm_ext; print(layernorm_ext.build_info()['simd'])"], check=True,
        env={k: v for k, v in os.environ.items() if k != "LAYERNORM_EXT_SIMD"},
    )
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(params=LEVELS)
def level(request):
    if request.param not in _runnable_levels():
        with pytest.raises(RuntimeError, match="supports at most"):
            _C._set_simd_level(request.param)
        pytest.skip(f"this CPU has no {request.param}")
    before = layernorm_ext.build_info()["simd"]
    _C._set_simd_level(request.param)
    assert layernorm_ext.build_info()["simd"] == request.param
    yield request.param
    _C._set_simd_level(before)


def test_default_level_is_what_the_cpu_supports():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = "scalar"
    if all(f" {f}" in flags for f in ("avx2", "fma")):
        expected = "avx2"
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx2", "fma")):
        expected = "avx512"
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("the expected level is read from Linux x86-64 /proc/cpuinfo")
    assert _default_level() == expected


def test_environment_variable_selects_the_level():
    env = dict(os.environ, LAYERNORM_EXT_SIMD="scalar")
    code = (
        "import torch, layernorm_ext; print(layernorm_ext.build_info()['simd']); "
        "print(layernorm_ext.layer_norm(torch.ones(2, 3), (3,)).sum().item())"
    )
    out = run_python(["-c", code], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "scalar"
    env["LAYERNORM_EXT_SIMD"] = "sse9"
    out = run_python(["-c", code], env=env)
    assert out.returncode != 0 and "unknown SIMD level 'sse9'" in out.stderr


def test_unknown_level_name_raises():
    with pytest.raises(RuntimeError, match="unknown SIMD level 'avx1024'"):
        _C._set_simd_level("avx1024")


# Column counts that cover every tail length of 16-, 8- and 4-lane vectors,
# the 4-vector unrolled loop and several sum chunks.
COLS = [1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 513, 1031, 4099]
# Relative to the reference's magnitude, the registry's tolerances.
TOL = {dtype: tolerance["rtol"] for dtype, tolerance in op_info("layer_norm").tolerances.items()}


def _rel_err(actual, expected):
    scale = max(expected.abs().max().item(), 1.0)
    return (actual.double() - expected).abs().max().item() / scale


@pytest.mark.parametrize("dtype", list(TOL))
def test_every_level_matches_float64(level, dtype):
    g = torch.Generator().manual_seed(11)
    for cols in COLS:
        x64 = torch.randn(5, cols, generator=g, dtype=torch.float64) * 3 + 1
        w64 = torch.randn(cols, generator=g, dtype=torch.float64)
        b64 = torch.randn(cols, generator=g, dtype=torch.float64)
        dy64 = torch.randn(5, cols, generator=g, dtype=torch.float64)
        x, w, b, dy = (t.to(dtype) for t in (x64, w64, b64, dy64))
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        xo, wo, bo = (t.clone().requires_grad_() for t in (x, w, b))
        for ours, ref, params in (
            (layernorm_ext.layer_norm(xo, (cols,), wo, bo), F.layer_norm(xr, (cols,), wr, br), 3),
            (layernorm_ext.rms_norm(xo, (cols,), wo, 1e-6), F.rms_norm(xr, (cols,), wr, 1e-6), 2),
        ):
            assert _rel_err(ours, ref) < TOL[dtype], (cols, "forward")
            got = torch.autograd.grad(ours, (xo, wo, bo)[:params], dy)
            want = torch.autograd.grad(ref, (xr, wr, br)[:params], dy.double())
            for name, a, e in zip(("input", "weight", "bias"), got, want):
                # The weight/bias gradients sum over rows: one more rounding each.
                assert _rel_err(a, e) < 2 * TOL[dtype], (cols, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stores_round_like_torch(level, dtype):
    # The kernels compute a float32 row the same way for a float32 input
    # holding the same values, so the reduced-precision output must be that
    # row rounded by torch's conversion, bit for bit. NaN is compared as NaN
    # only: we store c10::BFloat16's scalar 0x7fc0, torch's vectorized
    # conversion another NaN pattern.
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(9, 300, generator=g) * 4).to(dtype)
    x[3, 7] = float("nan")
    w = torch.randn(300, generator=g).to(dtype)
    b = torch.randn(300, generator=g).to(dtype)
    reference = layernorm_ext.layer_norm(x.float(), (300,), w.float(), b.float()).to(dtype)
    ours = layernorm_ext.layer_norm(x, (300,), w, b)
    finite = ~torch.isnan(reference)
    assert torch.equal(ours[finite].view(torch.int16), reference[finite].view(torch.int16))
    assert torch.isnan(ours[3]).all() and torch.equal(torch.isnan(ours), ~finite)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_sum_rounds_ties_to_even_like_torch(level, dtype):
    # 1 + half an ulp (and odd neighbours) are exact ties: round to even.
    ulp = torch.finfo(dtype).eps
    one = torch.ones(4, 40, dtype=dtype)
    x = one * torch.tensor([1.0, 1.0 + ulp, -1.0, 3.0], dtype=dtype).view(4, 1)
    r = torch.full((4, 40), ulp / 2, dtype=dtype)
    r[:, 5] = float("inf")
    r[:, 6] = float("nan")
    r[:, 7] = -ulp / 2
    _, s = layernorm_ext.fused_add_layer_norm(x, r, (40,))
    expected = x + r
    finite = ~torch.isnan(expected)
    assert torch.equal(s[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert torch.equal(torch.isnan(s), ~finite) and torch.isnan(s[:, 6]).all()


def test_thread_count_does_not_change_bits(level):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3000, 257, generator=g)
    w = torch.randn(257, generator=g)
    b = torch.randn(257, generator=g)
    dy = torch.randn(3000, 257, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, mean, rstd = torch.ops.layernorm_ext.layer_norm_forward(x, [257], w, b, 1e-5)
            grads = torch.ops.layernorm_ext.layer_norm_backward(
                dy, x, [257], mean, rstd, w, b, [True, True, True]
            )
            rms = torch.ops.layernorm_ext.rms_norm_backward(
                dy, x, [257], torch.ops.layernorm_ext.rms_norm_forward(x, [257], w, 1e-6)[1], w,
                [True, True],
            )
            results.append((out, mean, rstd, *grads, *rms))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.fixture
def streamed_stores():
    """Every output of 16 MiB or more written with non-temporal stores (where
    alignment permits), whatever the state of its memory: a fresh output, as
    glibc maps one, would otherwise be stored plainly."""
    _C._set_output_stores("streamed")
    yield
    _C._set_output_stores("auto")


def test_outputs_are_streamed_into_resident_memory_only():
    # The kernels stream an output when the page of its last element is
    # mapped in; a fresh anonymous mapping is not, until written.
    if sys.platform != "linux":
        pytest.skip("residency is read with Linux's mincore(); elsewhere outputs are always streamed")
    size = 4 << 20
    memory = mmap.mmap(-1, size)
    try:
        last = ctypes.addressof(ctypes.c_char.from_buffer(memory, size - 1))
        assert not _C._streams_output_at(last)
        memory[size - 1] = 1
        assert _C._streams_output_at(last)
        _C._set_output_stores("plain")
        assert not _C._streams_output_at(last)
        _C._set_output_stores("streamed")
        assert _C._streams_output_at(last - size + 1)
    finally:
        _C._set_output_stores("auto")
        memory.close()


def test_unknown_output_stores_raise():
    with pytest.raises(RuntimeError, match='expected "auto", "streamed" or "plain", got "fast"'):
        _C._set_output_stores("fast")


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 4096), (torch.bfloat16, 8192)])
def test_large_outputs_streamed_are_exact(level, streamed_stores, dtype, rows):
    # 16 MiB outputs with 64-byte aligned rows take the non-temporal store
    # path (the backward's only where a store fills whole lines: float32
    # with AVX-512): each row must have the bits it gets in a
    # small, plainly stored call, since a row's result does not depend on the
    # other rows; and the whole must match float64.
    cols = 1024
    g = torch.Generator().manual_seed(14)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.randn(cols, generator=g).to(dtype)
    b = torch.randn(cols, generator=g).to(dtype)
    ops = torch.ops.layernorm_ext
    out, mean, rstd = ops.layer_norm_forward(x, [cols], w, b, 1e-5)
    dx = ops.layer_norm_backward(dy, x, [cols], mean, rstd, w, b, [True, False, False])[0]
    rms_out, rms_rstd = ops.rms_norm_forward(x, [cols], w, 1e-6)
    for picked in (slice(0, 3), slice(rows - 5, rows)):
        small_out, small_mean, small_rstd = ops.layer_norm_forward(x[picked], [cols], w, b, 1e-5)
        assert torch.equal(out[picked], small_out)
        small_dx = ops.layer_norm_backward(
            dy[picked], x[picked], [cols], small_mean, small_rstd, w, b, [True, False, False]
        )[0]
        assert torch.equal(dx[picked], small_dx)
        assert torch.equal(rms_out[picked], ops.rms_norm_forward(x[picked], [cols], w, 1e-6)[0])
    reference = F.layer_norm(x.double(), (cols,), w.double(), b.double())
    assert _rel_err(out, reference) < TOL[dtype]
    assert _rel_err(rms_out, F.rms_norm(x.double(), (cols,), w.double(), 1e-6)) < TOL[dtype]


# --------------------------------------------------------------------------- BatchNorm

# (shape, memory format): plane lengths and channel counts that cover every
# tail of 16-, 8- and 4-lane vectors, the 4-vector strips of the row sums,
# folded channels-last rows (C < 64) with leftover rows, and several
# statistics blocks.
BN_CASES = [
    ((3, 5, 7), torch.contiguous_format),
    ((4, 3, 17, 3), torch.contiguous_format),
    ((2, 6, 33), torch.contiguous_format),
    ((3, 2, 14, 14), torch.contiguous_format),
    ((5, 1, 4099), torch.contiguous_format),
    ((40, 3, 70, 71), torch.contiguous_format),  # several statistics blocks per channel
    ((50, 7, 13, 17), torch.contiguous_format),  # short planes: channels swept in groups
    ((7, 3, 5, 3), torch.channels_last),
    ((5, 17, 3, 3), torch.channels_last),
    ((3, 100, 3, 5), torch.channels_last),
    ((2, 64, 9, 9), torch.channels_last),
    ((37, 1031), torch.contiguous_format),
    ((300, 130), torch.contiguous_format),
    ((2000, 5), torch.contiguous_format),
]
BN_TOL = {dtype: tolerance["rtol"] for dtype, tolerance in op_info("batch_norm").tolerances.items()}


@pytest.mark.parametrize("dtype", list(BN_TOL))
@pytest.mark.parametrize("training", [True, False])
def test_every_level_batch_norm_matches_float64(level, dtype, training):
    g = torch.Generator().manual_seed(15)
    for shape, memory_format in BN_CASES:
        channels = shape[1]
        x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).contiguous(
            memory_format=memory_format)
        w64, b64 = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5, torch.randn(
            channels, generator=g, dtype=torch.float64)
        rm64, rv64 = torch.randn(channels, generator=g, dtype=torch.float64), torch.rand(
            channels, generator=g, dtype=torch.float64) + 0.5
        dy64 = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=memory_format)
        x, dy = x64.to(dtype), dy64.to(dtype)
        params = [t.to(dtype) for t in (w64, b64, rm64, rv64)]
        xo, wo, bo = x.clone().requires_grad_(), params[0].clone().requires_grad_(), params[1].clone().requires_grad_()
        rm, rv = params[2].clone(), params[3].clone()
        ours = layernorm_ext.batch_norm(xo, rm, rv, wo, bo, training, 0.1, 1e-5)
        xr, wr, br = (t.double().requires_grad_() for t in (x, params[0], params[1]))
        rm_ref, rv_ref = params[2].double(), params[3].double()
        ref = F.batch_norm(xr, rm_ref, rv_ref, wr, br, training, 0.1, 1e-5)
        assert ours.stride() == ref.stride(), shape
        tol = BN_TOL[dtype]
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{shape}: {m}")
        got = torch.autograd.grad(ours, (xo, wo, bo), dy)
        want = torch.autograd.grad(ref, (xr, wr, br), dy.double())
        sums_scale = max(1.0, (x.numel() / channels) ** 0.5)
        for name, a, e, scale in zip(("input", "weight", "bias"), got, want, (1.0, sums_scale, sums_scale)):
            torch.testing.assert_close(
                a.double(), e, rtol=tol, atol=tol * scale, msg=lambda m: f"{shape} {name}: {m}")
        if training:
            torch.testing.assert_close(rm.double(), rm_ref.to(dtype).double(), rtol=tol, atol=tol)
            torch.testing.assert_close(rv.double(), rv_ref.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_reduced_precision_stores_round_like_torch(level, dtype, memory_format):
    # A float32 input holding the same values gives the same float32 results
    # (the loads widen exactly), so the reduced-precision output must be those
    # rounded by torch's conversion, bit for bit, whichever of the vector and
    # scalar paths stored an element.
    g = torch.Generator().manual_seed(16)
    x = (torch.randn(6, 19, 7, 5, generator=g) * 4).to(dtype).contiguous(memory_format=memory_format)
    w, b = torch.randn(19, generator=g), torch.randn(19, generator=g)
    dy = torch.randn(x.shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    ops = torch.ops.layernorm_ext
    for training in (True, False):
        rm, rv = torch.randn(19, generator=g), torch.rand(19, generator=g) + 0.5
        out, mean, rstd, _, _ = ops.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5)
        out32, mean32, rstd32, _, _ = ops.batch_norm_forward(x.float(), w, b, rm, rv, training, 0.1, 1e-5)
        assert torch.equal(mean, mean32) and torch.equal(rstd, rstd32)
        assert torch.equal(out.view(torch.int16), out32.to(dtype).view(torch.int16))
        dx = ops.batch_norm_backward(dy, x, w, b, mean, rstd, training, [True, True, True])
        dx32 = ops.batch_norm_backward(dy.float(), x.float(), w, b, mean, rstd, training, [True, True, True])
        assert torch.equal(dx[0].view(torch.int16), dx32[0].to(dtype).view(torch.int16))
        assert torch.equal(dx[1], dx32[1]) and torch.equal(dx[2], dx32[2])


@pytest.mark.parametrize(
    "shape,memory_format",
    [((8, 16, 48, 48), torch.contiguous_format), ((8, 16, 48, 48), torch.channels_last),
     ((8, 1, 96, 96), torch.contiguous_format), ((50, 7, 13, 17), torch.contiguous_format),
     ((20000, 3), torch.contiguous_format),
     ((3000, 70), torch.contiguous_format)],
)
def test_batch_norm_thread_count_does_not_change_bits(level, shape, memory_format):
    g = torch.Generator().manual_seed(17)
    x = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
    channels = shape[1]
    w, b = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    ops = torch.ops.layernorm_ext
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = ops.batch_norm_forward(x, w, b, torch.zeros(channels), torch.ones(channels), True, 0.1, 1e-5)
            grads = ops.batch_norm_backward(dy, x, w, b, out[1], out[2], True, [True, True, True])
            results.append((*out, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize(
    "shape,memory_format,dtype",
    [((16, 64, 64, 64), torch.contiguous_format, torch.float32),
     ((16, 67, 63, 64), torch.channels_last, torch.float32),
     ((32, 65, 63, 65), torch.contiguous_format, torch.bfloat16),
     ((700, 250, 5, 5), torch.contiguous_format, torch.float32)],  # planes of 1 to 2 Vecs
)
def test_batch_norm_large_outputs_streamed_are_exact(level, streamed_stores, shape, memory_format, dtype):
    # Outputs of 16 MiB or more take the non-temporal store path, planes and
    # rows at any alignment (the first elements up to a 64-byte boundary are
    # stored plainly, and runs too short to reach a boundary and fill a Vec
    # after it are not streamed). The eval forward and backward are elementwise, so a
    # slice of the batch, small enough to be stored plainly, must get the
    # same bits; the training forward is checked against float64.
    g = torch.Generator().manual_seed(18)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    assert x.numel() * x.element_size() >= 16 << 20
    channels = shape[1]
    w, b = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    rm, rv = torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    ops = torch.ops.layernorm_ext
    out, mean, rstd, _, _ = ops.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)
    dx = ops.batch_norm_backward(dy, x, w, b, mean, rstd, False, [True, False, False])[0]
    for picked in (slice(0, 1), slice(shape[0] - 1, shape[0])):
        small = ops.batch_norm_forward(x[picked], w, b, rm, rv, False, 0.1, 1e-5)[0]
        assert torch.equal(out[picked], small)
        small_dx = ops.batch_norm_backward(dy[picked], x[picked], w, b, mean, rstd, False, [True, False, False])[0]
        assert torch.equal(dx[picked], small_dx)
    train = ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)[0]
    reference = F.batch_norm(x.double(), None, None, w.double(), b.double(), True)
    assert _rel_err(train, reference) < BN_TOL[dtype]

"""BatchNorm: layernorm_ext.batch_norm and BatchNorm1d/2d/3d against torch.nn
(float64 references), autograd, state_dict, errors, determinism and torch.compile
(its float64 parity over the registry's samples is in
test_float64_reference.py, opcheck in test_opcheck.py)."""

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext.op_db import BATCH_NORM_LAYOUTS, BATCH_NORM_SHAPES, DTYPES, op_info

_ops = torch.ops.layernorm_ext

MODULES = {
    2: (layernorm_ext.BatchNorm1d, torch.nn.BatchNorm1d),
    3: (layernorm_ext.BatchNorm1d, torch.nn.BatchNorm1d),
    4: (layernorm_ext.BatchNorm2d, torch.nn.BatchNorm2d),
    5: (layernorm_ext.BatchNorm3d, torch.nn.BatchNorm3d),
}

BATCH_NORM = op_info("batch_norm")
TOLERANCES = BATCH_NORM.tolerances


@dataclass
class Sample:
    """A module test's input: shape, layout (a registry layout) and dtype, and
    the module's dtype (None: the input's)."""

    shape: tuple
    layout: str = "contiguous"
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None

    def input(self, dtype=None):
        """Fresh random data in the sample's layout (the registry's batch_norm
        input values: mean 0.5, std 2)."""
        return BATCH_NORM.make_sample(self.shape, "cpu", dtype or self.dtype, layout=self.layout).input

    def __str__(self):
        return f"{self.shape}-{self.layout}-{str(self.dtype)[6:]}-{str(self.param_dtype)[6:]}"


def _module_samples():
    """Every shape in every layout of the registry's batch_norm samples, in
    every dtype, and half/bfloat16 inputs to float32 modules."""
    dtypes = [(dtype, None) for dtype in DTYPES] + [
        (dtype, torch.float32) for dtype in (torch.float16, torch.bfloat16)
    ]
    return [
        Sample(shape, layout, dtype, param_dtype)
        for dtype, param_dtype in dtypes
        for shape in BATCH_NORM_SHAPES
        for layout in BATCH_NORM_LAYOUTS
        if layout != "channels_last" or len(shape) in (4, 5)
    ]


SAMPLES = _module_samples()


def make_modules(sample, affine=True, track_running_stats=True, momentum=0.1):
    """Our module (in the sample's parameter dtype) and torch's in float64, in the
    same random state."""
    ours_cls, torch_cls = MODULES[len(sample.shape)]
    channels = sample.shape[1]
    param_dtype = sample.param_dtype or sample.dtype
    kwargs = {"affine": affine, "track_running_stats": track_running_stats, "momentum": momentum}
    ours = ours_cls(channels, dtype=param_dtype, **kwargs)
    with torch.no_grad():
        if affine:
            ours.weight.copy_(torch.rand(channels) + 0.5)
            ours.bias.copy_(torch.randn(channels))
        if track_running_stats:
            ours.running_mean.copy_(torch.randn(channels))
            ours.running_var.copy_(torch.rand(channels) + 0.5)
    reference = torch_cls(channels, dtype=torch.float64, **kwargs)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale
    )


def check_step(ours, reference, x, dtype):
    """One forward + backward of both modules on x; compares output, gradients,
    buffers and the output's memory format."""
    x_ours = x.detach().requires_grad_()  # keeps x's strides (clone would not for "strided")
    x_ref = x.detach().double().requires_grad_()
    y = ours(x_ours)
    y_ref = reference(x_ref)
    assert y.dtype == x.dtype and y.shape == x.shape
    # The output's memory format is torch's (channels-last stays channels-last).
    assert y.stride() == F.batch_norm(x.detach(), None, None, training=True).stride()
    assert_close(y, y_ref, dtype)
    grad = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y.backward(grad)
    y_ref.backward(grad.double())
    assert_close(x_ours.grad, x_ref.grad, dtype)
    sums_scale = max(1.0, (x.numel() / x.shape[1]) ** 0.5)
    if ours.affine:
        assert_close(ours.weight.grad, reference.weight.grad, dtype, sums_scale)
        assert_close(ours.bias.grad, reference.bias.grad, dtype, sums_scale)
        ours.zero_grad()
        reference.zero_grad()
    if ours.track_running_stats:
        assert_close(ours.running_mean, reference.running_mean, dtype)
        assert_close(ours.running_var, reference.running_var, dtype)
        assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
def test_module_matches_torch_train_then_eval(sample):
    torch.manual_seed(0)
    ours, reference = make_modules(sample)
    for _ in range(3):
        check_step(ours, reference, sample.input(), sample.dtype)
    ours.eval()
    reference.eval()
    check_step(ours, reference, sample.input(), sample.dtype)
    assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False, "momentum": None},
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "sample",
    [Sample((6, 5)), Sample((4, 6, 5, 7), "channels_last"), Sample((3, 4, 3, 5, 2))],
    ids=str,
)
def test_module_options_match_torch(sample, options):
    torch.manual_seed(1)
    ours, reference = make_modules(sample, **options)
    for _ in range(4):
        check_step(ours, reference, sample.input(), sample.dtype)
    ours.eval()
    reference.eval()
    check_step(ours, reference, sample.input(), sample.dtype)


def test_module_half_parameters_match_torch():
    """A float16 module (parameters and buffers in float16) on float16 input."""
    torch.manual_seed(2)
    sample = Sample((8, 4, 6, 6), dtype=torch.float16)
    ours, reference = make_modules(sample)
    assert ours.running_mean.dtype == torch.float16
    for _ in range(2):
        check_step(ours, reference, sample.input(), sample.dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "sample", [Sample((5, 4, 9)), Sample((3, 4, 5, 6), "channels_last")], ids=str
)
def test_functional_matches_torch(sample, training):
    torch.manual_seed(3)
    x = sample.input()
    channels = sample.shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    ours_stats = [torch.randn(channels), torch.rand(channels) + 0.5]
    ref_stats = [s.double() for s in ours_stats]
    y = layernorm_ext.batch_norm(x, *ours_stats, weight, bias, training, 0.3, 1e-3)
    y_ref = F.batch_norm(
        x.double(), *ref_stats, weight.double(), bias.double(), training, 0.3, 1e-3
    )
    assert_close(y, y_ref, torch.float32)
    assert_close(ours_stats[0], ref_stats[0], torch.float32)
    assert_close(ours_stats[1], ref_stats[1], torch.float32)
    # Without running stats in training: batch statistics, nothing updated.
    if training:
        y = layernorm_ext.batch_norm(x, None, None, weight, bias, True)
        assert_close(
            y,
            F.batch_norm(x.double(), None, None, weight.double(), bias.double(), True),
            torch.float32,
        )


def test_large_mean_is_exact():
    """Channels with mean 1e4 and unit variance: a one-pass E[x^2] - E[x]^2 in
    float32 would lose the variance; the two-pass blocks keep float32 accuracy."""
    torch.manual_seed(4)
    for shape, layout in [
        ((16, 3, 40, 40), "contiguous"),
        ((16, 3, 40, 40), "channels_last"),
        ((5000, 3), "contiguous"),
    ]:
        x64 = torch.randn(shape, dtype=torch.float64) + 1e4
        x = x64.float()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        rm, rv = torch.zeros(3), torch.ones(3)
        y = layernorm_ext.batch_norm(x, rm, rv, training=True)
        ref_rm, ref_rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        y_ref = F.batch_norm(x.double(), ref_rm, ref_rv, training=True)
        # The float32 mean itself is only good to an ulp or two of 1e4 (ulp = 9.8e-4).
        torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=2e-3)
        torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-4, atol=0)
        torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_blocks_led_by_an_outlier_are_exact(layout):
    """A statistics block's one-sweep variance (sums of x - shift and its
    square, shift the block's first value) cancels by (mean - shift)^2 / var
    roundings: with a first value of 1e3 among unit values, about 1e3 of them
    here, and a one-sweep variance off by 1e-3 (outputs by 5e-4). The kernels
    must notice and take the deviations from the mean."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, 128, 64, generator=g)
    x[0, :, 0, 0] = 1e3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        x[:, :, 2, 0] = 1e3  # channels-last row blocks start further on
    y = layernorm_ext.batch_norm(x, None, None, training=True)
    y_ref = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=5e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 3)])
def test_empty_batch_matches_torch(shape):
    ours, reference = make_modules(Sample(shape))
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    y_ref = reference(x.detach().double())
    assert y.shape == y_ref.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(ours.running_mean.double(), reference.running_mean)
    torch.testing.assert_close(ours.running_var.double(), reference.running_var)
    assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item() == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("running_stats", [True, False], ids=["running_stats", "none"])
def test_one_dim_empty_input_matches_torch(training, running_stats):
    """A 1-D input has no channels: torch accepts an empty one, (0,), with
    [0]-shaped running statistics (required in eval), and returns it."""
    if not training and not running_stats:
        with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
            layernorm_ext.batch_norm(torch.empty(0), None, None, training=False)
        return
    results = []
    for bn in (layernorm_ext.batch_norm, F.batch_norm):
        x = torch.empty(0, dtype=torch.float64, requires_grad=True)
        stats = (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)) if running_stats else (None, None)
        y = bn(x, *stats, training=training)
        (grad_x,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
        results.append((y, grad_x, stats))
    (y, grad_x, stats), (y_ref, grad_x_ref, stats_ref) = results
    assert y.shape == y_ref.shape == (0,) and y.dtype == y_ref.dtype
    assert grad_x.shape == grad_x_ref.shape == (0,)
    for ours, theirs in zip(stats, stats_ref):
        assert (ours is None and theirs is None) or ours.shape == theirs.shape == (0,)


# --------------------------------------------------------------------------- autograd


def test_backward_mask_gives_only_asked_gradients():
    torch.manual_seed(6)
    x = torch.randn(4, 3, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    _, mean, rstd, _, _ = _ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    dy = torch.randn_like(x)
    gi, gw, gb = _ops.batch_norm_backward(dy, x, w, b, mean, rstd, True, [False, True, False])
    assert gi.shape == (0,) and gb.shape == (0,) and gw.shape == (3,)
    full = _ops.batch_norm_backward(dy, x, w, b, mean, rstd, True, [True, True, True])
    assert torch.equal(gw, full[1])


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 4, 3, 5, 6)])
def test_grad_input_keeps_the_input_memory_format(shape):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).contiguous(memory_format=fmt)
    _, mean, rstd, _, _ = _ops.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    dy = torch.randn(shape)  # contiguous: the op reads it in the input's format
    grad_input = _ops.batch_norm_backward(
        dy, x, None, None, mean, rstd, True, [True, False, False]
    )[0]
    assert grad_input.is_contiguous(memory_format=fmt) and not grad_input.is_contiguous()
    reference = _ops.batch_norm_backward(
        dy, x.contiguous(), None, None, mean, rstd, True, [True, False, False]
    )[0]
    torch.testing.assert_close(grad_input, reference)


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("dims", [2, 4, 5])
def test_state_dict_round_trip(dims):
    ours_cls, torch_cls = MODULES[dims]
    torch.manual_seed(7)
    theirs = torch_cls(4)
    x = torch.randn((6, 4) + (3,) * (dims - 2))
    theirs(x)
    theirs(x)
    ours = ours_cls(4)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    back = torch_cls(4)
    back.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, torch_cls)


def test_old_checkpoint_without_num_batches_tracked():
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 2, 2))
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # written before num_batches_tracked existed
    ours = layernorm_ext.BatchNorm2d(3)
    ours.load_state_dict(state)  # strict: the missing key is filled in
    reference = torch.nn.BatchNorm2d(3)
    reference.load_state_dict(state)
    assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item() == 0
    assert torch.equal(ours.running_mean, theirs.running_mean)


# --------------------------------------------------------------------------- errors


def torch_error(fn):
    """The exception torch raises for fn (so that messages are checked against
    torch itself, not copied from this implementation)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value).splitlines()[0]


def module_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "dims, shape",
    [
        (2, (1, 4)),  # one value per channel
        (3, (1, 4, 1)),  # one value per channel
        (4, (5, 3, 2, 2)),  # wrong channel count
        (4, (5, 4, 2)),  # wrong rank
        (2, (5, 4, 2, 2)),  # wrong rank
        (5, (2, 4, 2, 2)),  # wrong rank
    ],
)
def test_module_errors_match_torch_and_leave_state(dims, shape):
    ours_cls, torch_cls = MODULES[dims]
    torch.manual_seed(8)
    ours, theirs = ours_cls(4), torch_cls(4)
    ours(torch.randn((3, 4) + (2,) * (dims - 2)))
    before = module_state(ours)
    x = torch.randn(shape)
    error_type, message = torch_error(lambda: theirs(x))
    with pytest.raises(error_type, match=re.escape(message)):
        ours(x)
    for key, value in module_state(ours).items():
        assert torch.equal(value, before[key]), key
    assert ours.num_batches_tracked.item() == 1


def test_momentum_none_error_leaves_counter():
    ours = layernorm_ext.BatchNorm1d(3, momentum=None)
    ours(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(torch.randn(1, 3))
    assert ours.num_batches_tracked.item() == 1
    # The next batch still weighs 1/2, as torch's would after one good batch.
    theirs = torch.nn.BatchNorm1d(3, momentum=None)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3)
    ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


C = 3
_x = torch.randn(4, C, 5)
# Each case calls f (torch's or ours) with running stats rm, rv.
FUNCTIONAL_ERRORS = {
    "integer input": lambda f, rm, rv: f(torch.ones(4, C, dtype=torch.long), rm, rv),
    "1-D input": lambda f, rm, rv: f(torch.randn(4), rm, rv),
    "running_mean count": lambda f, rm, rv: f(_x, torch.zeros(4), rv, training=True),
    "running_var count": lambda f, rm, rv: f(_x, rm, torch.ones(4), training=True),
    "weight count": lambda f, rm, rv: f(_x, rm, rv, weight=torch.ones(4), training=True),
    "bias count": lambda f, rm, rv: f(_x, rm, rv, bias=torch.ones(4), training=True),
    "eval without running_mean": lambda f, rm, rv: f(_x, None, None),
    "eval without running_var": lambda f, rm, rv: f(_x, rm, None),
    "training with one running stat": lambda f, rm, rv: f(_x, rm, None, training=True),
    "one value per channel": lambda f, rm, rv: f(torch.randn(1, C), rm, rv, training=True),
    "eps zero in training": lambda f, rm, rv: f(_x, rm, rv, training=True, eps=0.0),
    "negative eps": lambda f, rm, rv: f(_x, rm, rv, eps=-1.0),
}


@pytest.mark.parametrize("case", FUNCTIONAL_ERRORS, ids=str)
def test_functional_errors_match_torch_and_leave_running_stats(case):
    call = FUNCTIONAL_ERRORS[case]
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    error_type, message = torch_error(lambda: call(F.batch_norm, rm.clone(), rv.clone()))
    ours_rm, ours_rv = rm.clone(), rv.clone()
    with pytest.raises(error_type, match=re.escape(message)):
        call(layernorm_ext.batch_norm, ours_rm, ours_rv)
    assert torch.equal(ours_rm, rm) and torch.equal(ours_rv, rv)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: layernorm_ext.batch_norm(_x, torch.zeros(C).double(), torch.ones(C).double()),
            "expected running_mean of dtype Float",
        ),
        (
            lambda: layernorm_ext.batch_norm(_x.half(), torch.zeros(C), torch.ones(C).half()),
            "of one dtype",
        ),
        (
            lambda: layernorm_ext.batch_norm(
                _x, torch.zeros(C), torch.ones(C), torch.ones(C, dtype=torch.float64)
            ),
            "expected weight of dtype Float",
        ),
    ],
)
def test_functional_own_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_backward_op_checks_its_arguments():
    x = torch.randn(4, 3, 5)
    mean, rstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="grad_output of the input's shape"):
        _ops.batch_norm_backward(
            torch.randn(4, 3), x, None, None, mean, rstd, True, [True, False, False]
        )
    with pytest.raises(RuntimeError, match="save_rstd of 3 elements"):
        _ops.batch_norm_backward(x, x, None, None, mean, torch.ones(2), True, [True, False, False])
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 2"):
        _ops.batch_norm_backward(x, x, torch.ones(2), None, mean, rstd, True, [True, True, False])


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "sample",
    [
        Sample((8, 16, 48, 48)),
        Sample((8, 16, 48, 48), "channels_last"),
        # One channel: a task per channel with one thread, blocks spread over
        # threads with two; the statistics must not notice.
        Sample((8, 1, 96, 96)),
        Sample((20000, 3)),
    ],
    ids=str,
)
def test_same_bits_for_any_thread_count(sample):
    torch.manual_seed(9)
    x = sample.input()
    channels = sample.shape[1]
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    grad = torch.randn_like(x)

    def run():
        xr = x.clone().requires_grad_()
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.zeros(channels), torch.ones(channels)
        y = layernorm_ext.batch_norm(xr, rm, rv, wr, br, True)
        y.backward(grad)
        return [y, rm, rv, xr.grad, wr.grad, br.grad]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        double = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(single, double):
        assert torch.equal(a, b_)


# --------------------------------------------------------------------------- op registration


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = layernorm_ext.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_compile_fullgraph_conv_bn_updates_running_stats():
    torch.manual_seed(11)
    eager = ConvBN()
    compiled_model = ConvBN()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)  # a graph break raises
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        y_eager = eager(x)
        y_compiled = compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    for name, param in eager.named_parameters():
        torch.testing.assert_close(
            dict(compiled_model.named_parameters())[name].grad, param.grad, rtol=1e-4, atol=1e-4
        )
    torch.testing.assert_close(compiled_model.bn.running_mean, eager.bn.running_mean)
    torch.testing.assert_close(compiled_model.bn.running_var, eager.bn.running_var)
    assert compiled_model.bn.num_batches_tracked.item() == eager.bn.num_batches_tracked.item() == 2
    assert not torch.equal(eager.bn.running_mean, torch.zeros(8))

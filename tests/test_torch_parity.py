"""Parity with what torch accepts and raises: tensors on another
device than the input (the meta device among them), batch_norm inputs of
fewer than 2 or more than 5 dims, negative and NaN eps, empty inputs with
parameters of another dtype, and integer inputs. Every test runs torch on the
same call and compares: the exception type, or the values against torch's
float64 result."""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext.op_db import EPS, MOMENTUM, OP_DB, SampleInput, op_info

_ops = torch.ops.layernorm_ext
_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh random data, the same on every run."""
    torch.manual_seed(0)

C = 3  # channels
D = 5  # normalized features


class Op:
    """An op of the registry (BatchNorm in one mode) called with its tensor
    arguments by name, the other arguments those of a registry sample:
    `tensors` makes fresh random ones (input first); `ours` and `theirs`
    (torch's reference) call with them; `op` gives the forward op and its
    positional arguments, to call its CPU kernel directly."""

    def __init__(self, info, name=None, **options):
        self.info, self.options, self.name = info, options, name or info.name
        self.shape = (4, C, 2) if info.name == "batch_norm" else (4, D)
        self.argument_names = list(inspect.signature(info.op).parameters)
        self.template = info.make_sample(self.shape, "cpu", torch.float64, **options)

    def tensors(self, dtype=torch.float64):
        sample = self.info.make_sample(self.shape, "cpu", dtype, **self.options)
        return {n: a for n, a in zip(self.argument_names, sample.args) if isinstance(a, torch.Tensor)}

    def sample(self, eps=EPS, **tensors):
        arguments = dict(zip(self.argument_names, self.template.args), **tensors, eps=eps)
        return SampleInput(tuple(arguments[n] for n in self.argument_names))

    def ours(self, **tensors):
        return self.info.op(*self.sample(**tensors).args)

    def theirs(self, **tensors):
        return self.info.ref(*self.sample(**tensors).args)

    def op(self, **tensors):
        overload = getattr(_ops, self.info.forward_op).default
        return overload, self.info.forward_arguments(self.sample(**tensors))


BATCH_NORM_TRAINING = Op(op_info("batch_norm"), "batch_norm-training", training=True)
OPS = [BATCH_NORM_TRAINING, Op(op_info("batch_norm"), "batch_norm-eval", training=False)] + [
    Op(info) for info in OP_DB if info.name != "batch_norm"
]
ROW_OPS = [op for op in OPS if not op.name.startswith("batch_norm")]


def raised(fn):
    """The exception fn raises (None if it returns)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - torch's exception, whatever it is
        return error
    return None


def first_line(error):
    return str(error).splitlines()[0]


def outputs(result):
    """A call's tensors, as a tuple (absent ones left out)."""
    return tuple(t for t in (result if isinstance(result, tuple) else (result,)) if t is not None)


def assert_matches_float64(ours, reference, equal_nan=False):
    for got, want in zip(outputs(ours), outputs(reference), strict=True):
        assert got.shape == want.shape and got.device == want.device
        torch.testing.assert_close(
            got.double(), want.double(), rtol=2e-5, atol=2e-5, equal_nan=equal_nan
        )


def clones(tensors):
    """Copies of the tensors with values (None and meta ones left out)."""
    return {k: v.clone() for k, v in tensors.items() if v is not None and v.device.type != "meta"}


def torch_error(call, tensors):
    """What torch raises for call on copies of the tensors (torch's
    batch_norm may update a running statistic before it raises)."""
    return raised(lambda: call(**{k: None if v is None else v.clone() for k, v in tensors.items()}))


def assert_unchanged(tensors, before):
    for name, value in before.items():
        assert torch.equal(tensors[name], value), f"{name} changed"


def cases(ops, names_of):
    return [pytest.param(op, name, id=f"{op.name}-{name}") for op in ops for name in names_of(op)]


def _argument_names(op):
    return [n for n in op.tensors() if n != "input"]


# --------------------------------------------------------------------------- devices (item 3)


def assert_device_error(op, tensors, name, input_device):
    """The call raises torch's exception type with the CPU kernel's message
    about `name` not being on the input's device, and changes nothing."""
    other_device = tensors[name].device
    before = clones(tensors)
    theirs = torch_error(op.theirs, tensors)
    assert theirs is not None
    with pytest.raises(type(theirs)) as ours:
        op.ours(**tensors)
    overload, args = op.op(**tensors)
    assert first_line(ours.value) == first_line(raised(lambda: overload.redispatch(_CPU_KERNEL, *args)))
    expected = f"expected {name} on the input's device {input_device}, but got {name} on {other_device}"
    assert expected in str(ours.value)
    assert_unchanged(tensors, before)


@pytest.mark.parametrize("op, name", cases(OPS, _argument_names))
def test_argument_on_meta_raises_the_kernels_device_error(op, name):
    """A meta argument with a CPU input reaches the fake kernel (the meta key
    outranks CPU), which must raise what the CPU kernel raises, before any
    running statistic changes, rather than return uninitialised memory."""
    tensors = op.tensors()
    tensors[name] = torch.empty_like(tensors[name], device="meta")
    assert_device_error(op, tensors, name, "cpu")


@pytest.mark.parametrize("op, name", cases(OPS, _argument_names))
def test_meta_input_with_a_cpu_argument_raises_like_torch(op, name):
    tensors = {k: torch.empty_like(v, device="meta") for k, v in op.tensors().items()}
    tensors[name] = op.tensors()[name]
    assert_device_error(op, tensors, name, "meta")


def _backward_calls():
    """Each backward op with its tensor arguments by name and the rest of its
    arguments (statistics from its forward) around them."""
    x, dy, w, b = torch.randn(4, D), torch.randn(4, D), torch.randn(D), torch.randn(D)
    _, mean, rstd = _ops.layer_norm_forward(x, [D], w, b, EPS)
    _, rms_rstd = _ops.rms_norm_forward(x, [D], w, EPS)
    xb, dyb, wb, bb = torch.randn(4, C, 2), torch.randn(4, C, 2), torch.randn(C), torch.randn(C)
    _, save_mean, save_rstd, _, _ = _ops.batch_norm_forward(xb, wb, bb, None, None, True, MOMENTUM, EPS)
    return {
        "layer_norm_backward": (
            _ops.layer_norm_backward.default,
            {"grad_output": dy, "weight": w, "bias": b},
            lambda grad_output, weight, bias: (
                grad_output, x, [D], mean, rstd, weight, bias, [True] * 3
            ),
        ),
        "rms_norm_backward": (
            _ops.rms_norm_backward.default,
            {"grad_output": dy, "weight": w},
            lambda grad_output, weight: (grad_output, x, [D], rms_rstd, weight, [True] * 2),
        ),
        "batch_norm_backward": (
            _ops.batch_norm_backward.default,
            {"grad_output": dyb, "weight": wb, "bias": bb},
            lambda grad_output, weight, bias: (
                grad_output, xb, weight, bias, save_mean, save_rstd, True, [True] * 3
            ),
        ),
    }


@pytest.mark.parametrize(
    "op_name, name",
    [(op_name, name) for op_name, (_, tensors, _) in _backward_calls().items() for name in tensors],
    ids=str,
)
def test_backward_argument_on_meta_raises_the_kernels_device_error(op_name, name):
    op, tensors, arguments = _backward_calls()[op_name]
    tensors[name] = torch.empty_like(tensors[name], device="meta")
    args = arguments(**tensors)
    with pytest.raises(RuntimeError) as ours:
        op(*args)
    assert first_line(ours.value) == first_line(raised(lambda: op.redispatch(_CPU_KERNEL, *args)))
    assert f"expected {name} on the input's device cpu, but got {name} on meta" in str(ours.value)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_all_on_meta_gives_torchs_meta_outputs(op):
    tensors = {k: torch.empty_like(v, device="meta") for k, v in op.tensors().items()}
    for got, want in zip(outputs(op.ours(**tensors)), outputs(op.theirs(**tensors)), strict=True):
        assert (got.device, got.shape, got.dtype) == (want.device, want.shape, want.dtype)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_batch_norm_module_with_a_meta_tensor_changes_no_state(name):
    ours = layernorm_ext.BatchNorm1d(C)
    theirs = torch.nn.BatchNorm1d(C)
    for module in (ours, theirs):
        if name in ("weight", "bias"):
            setattr(module, name, torch.nn.Parameter(torch.empty(C, device="meta")))
        else:
            module.register_buffer(name, torch.empty(C, device="meta"))
    x = torch.randn(4, C)
    before = {k: v.clone() for k, v in ours.state_dict().items() if v.device.type == "cpu"}
    theirs_error = raised(lambda: theirs(x))
    assert theirs_error is not None
    with pytest.raises(type(theirs_error), match=f"expected {name} on the input's device cpu"):
        ours(x)
    assert_unchanged(ours.state_dict(), before)


# --------------------------------------------------------------------------- batch_norm dims (item 7)


def _bn_call(f, x, stats, training, weight=None):
    """f (torch's or our batch_norm) on x with running stats of `stats`
    elements each (None: none), in float64; returns the output and the
    running stats after the call."""
    torch.manual_seed(3)
    rm = None if stats is None else torch.randn(stats, dtype=torch.float64)
    rv = None if stats is None else torch.rand(stats, dtype=torch.float64) + 0.5
    w = None if weight is None else torch.randn(weight, dtype=torch.float64)
    return f(x, rm, rv, w, None, training, MOMENTUM, EPS), rm, rv


def _bn_cases():
    # (input shape, running stats' element count or None, weight's or None, modes)
    both = (True, False)
    cases = [
        ((5,), C, None, both), ((5,), 0, None, both), ((5,), None, None, both),
        ((5,), None, C, both), ((5,), 0, 0, both), ((1,), None, None, both),
        ((), C, None, both), ((), 0, None, both), ((), None, None, both),
        ((0,), 0, None, both), ((0,), None, None, (True,)),
        ((2, C, 2, 2, 2, 2), C, C, both), ((2, C, 2, 1, 3, 2, 2), C, None, both),
        ((2, C, 2, 2, 2, 2), None, C, both), ((0, C, 2, 2, 2, 2), C, C, both),
        ((2, C, 2, 2, 2, 2), C + 1, None, both),
    ]
    return [
        pytest.param(shape, stats, weight, training, id=f"{shape}-stats{stats}-w{weight}-{training}")
        for shape, stats, weight, modes in cases
        for training in modes
    ]


@pytest.mark.parametrize("shape, stats, weight, training", _bn_cases())
def test_batch_norm_input_dims_match_torch(shape, stats, weight, training):
    x = torch.randn(shape, dtype=torch.float64)
    theirs = raised(lambda: _bn_call(F.batch_norm, x, stats, training, weight))
    if theirs is not None:
        with pytest.raises(type(theirs)) as ours:
            _bn_call(layernorm_ext.batch_norm, x, stats, training, weight)
        assert type(ours.value) is type(theirs)
        return
    assert_matches_float64(
        _bn_call(layernorm_ext.batch_norm, x, stats, training, weight),
        _bn_call(F.batch_norm, x, stats, training, weight),
    )


def test_batch_norm_6d_gradients_match_torch():
    x = torch.randn(2, C, 2, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(x.shape, dtype=torch.float64)
    grads = [
        torch.autograd.grad(f(x, None, None, w, b, training=True), (x, w, b), dy)
        for f in (layernorm_ext.batch_norm, F.batch_norm)
    ]
    assert_matches_float64(tuple(grads[0]), tuple(grads[1]))


# --------------------------------------------------------------------------- eps (item 7)

EPSILONS = [-1e-5, -1.0, 0.0, float("nan")]


def _rows_of_two_scales(tensors):
    """Rows of variance ~1e-2 and ~9, so that eps=-1 makes some rows NaN and
    leaves the others finite, far from the boundary in either dtype."""
    scale = torch.tensor([0.1, 3.0], dtype=torch.float64).repeat(2).unsqueeze(1)
    for name in ("input", "residual"):
        if name in tensors:
            tensors[name] = tensors[name] * scale
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", EPSILONS, ids=str)
@pytest.mark.parametrize("op", ROW_OPS, ids=lambda op: op.name)
def test_row_norm_eps_of_any_sign_matches_torch(op, eps, dtype):
    tensors = _rows_of_two_scales(op.tensors())
    ours = op.ours(**{k: v.to(dtype) for k, v in tensors.items()}, eps=eps)
    assert_matches_float64(ours, op.theirs(**tensors, eps=eps), equal_nan=True)


@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan")], ids=str)
@pytest.mark.parametrize("kind", [layernorm_ext.LayerNorm, layernorm_ext.RMSNorm], ids=lambda k: k.__name__)
def test_row_norm_module_eps_of_any_sign_matches_torch(kind, eps):
    ours = kind(D, eps=eps, dtype=torch.float64)
    theirs = getattr(torch.nn, kind.__name__)(D, eps=eps, dtype=torch.float64)
    x = _rows_of_two_scales({"input": torch.randn(4, D, dtype=torch.float64)})["input"]
    assert_matches_float64(ours(x), theirs(x), equal_nan=True)


@pytest.mark.parametrize("eps", EPSILONS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_eps_of_any_sign_matches_torch(training, eps):
    tensors = BATCH_NORM_TRAINING.tensors()
    args = [tensors[k] for k in ("input", "running_mean", "running_var", "weight", "bias")]
    before = [t.clone() for t in args]
    theirs_args = [t.clone() for t in args]
    try:
        theirs = F.batch_norm(*theirs_args, training, MOMENTUM, eps)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(first_line(error))):
            layernorm_ext.batch_norm(*args, training, MOMENTUM, eps)
        assert_unchanged(dict(enumerate(args)), dict(enumerate(before)))
        return
    ours = layernorm_ext.batch_norm(*args, training, MOMENTUM, eps)
    assert_matches_float64((ours, *args[1:3]), (theirs, *theirs_args[1:3]), equal_nan=True)


@pytest.mark.parametrize("eps", [-1e-5, 0.0], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_module_eps_matches_torch(training, eps):
    ours = layernorm_ext.BatchNorm1d(C, eps=eps).train(training)
    theirs = torch.nn.BatchNorm1d(C, eps=eps).train(training)
    x = torch.randn(4, C)
    theirs_error = raised(lambda: theirs(x))
    if theirs_error is not None:
        with pytest.raises(type(theirs_error)):
            ours(x)
        assert ours.num_batches_tracked.item() == 0
        return
    assert_matches_float64(ours(x), theirs(x))


# --------------------------------------------------------------------------- empty input, mixed dtypes (item 7)


@pytest.mark.parametrize("shape", [(0, C), (0, C, 4), (2, C, 0), (0,)], ids=str)
@pytest.mark.parametrize(
    "dtype, param_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float64)],
    ids=str,
)
@pytest.mark.parametrize("training", [True, False])
def test_empty_input_with_parameters_of_another_dtype_matches_torch(shape, dtype, param_dtype, training):
    """torch returns an empty output (times weight[0], plus bias[0]) before it
    looks at any dtype; the running statistics stay."""
    channels = C if len(shape) >= 2 else 0
    results = []
    for f in (layernorm_ext.batch_norm, F.batch_norm):
        torch.manual_seed(4)
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        rm = torch.randn(channels, dtype=param_dtype)
        rv = torch.rand(channels, dtype=param_dtype) + 0.5
        # torch indexes weight[0] and bias[0]: none without channels.
        w, b = (
            torch.randn(channels, dtype=param_dtype, requires_grad=True) if channels else None
            for _ in range(2)
        )
        y = f(x, rm, rv, w, b, training, MOMENTUM, EPS)
        y.sum().backward()
        results.append(outputs((y, rm, rv, x.grad, *(p.grad for p in (w, b) if p is not None))))
    ours, theirs = results
    for got, want in zip(ours, theirs, strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert torch.equal(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_empty_float64_batch_in_a_float32_module_matches_torch(training):
    ours = layernorm_ext.BatchNorm2d(C).train(training)
    theirs = torch.nn.BatchNorm2d(C).train(training)
    x = torch.randn(0, C, 4, 4, dtype=torch.float64)
    y, y_ref = ours(x), theirs(x)
    assert (y.shape, y.dtype) == (y_ref.shape, y_ref.dtype)
    for (key, value), (_, want) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(value, want), key


# --------------------------------------------------------------------------- integer input (item 7)

INTEGER_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool]


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_integer_input_raises_like_torch(op, affine, dtype):
    """torch raises NotImplementedError for integer input, except layer_norm
    with a float weight or bias, which first finds the dtypes mixed (a
    RuntimeError, of which NotImplementedError is a subclass)."""
    tensors = op.tensors(torch.float32)
    for name in ("input", "residual"):
        if name in tensors:
            tensors[name] = tensors[name].mul(3).to(dtype)
    if not affine:
        tensors.update({k: None for k in ("weight", "bias") if k in tensors})
    before = clones(tensors)
    theirs = torch_error(op.theirs, tensors)
    assert isinstance(theirs, RuntimeError)
    with pytest.raises(type(theirs)):
        op.ours(**tensors)
    assert_unchanged(tensors, before)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (layernorm_ext.BatchNorm1d(C), torch.nn.BatchNorm1d(C)),
        (layernorm_ext.LayerNorm(C), torch.nn.LayerNorm(C)),
        (layernorm_ext.RMSNorm(C), torch.nn.RMSNorm(C)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_integer_input_to_a_module_raises_like_torch(ours, theirs, dtype):
    x = torch.randn(4, C).mul(3).to(dtype)
    theirs_error = raised(lambda: theirs(x))
    assert isinstance(theirs_error, RuntimeError)
    with pytest.raises(type(theirs_error)):
        ours(x)

"""TorchScript (torch.jit.script, torch.jit.trace), torch.fx.symbolic_trace and
memory formats: the scripted, traced and fx-traced modules run our ops and
give the eager results (running statistics and counters included), and
rms_norm / layer_norm outputs and input gradients have torch's strides."""

import copy
import io

import pytest
import torch
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import FakeTensorMode

import layernorm_ext

F = torch.nn.functional
CL = torch.channels_last
CL3D = torch.channels_last_3d


def random(*shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    return torch.randn(shape, dtype=torch.float64).mul(2.0).add(0.5).to(dtype).contiguous(
        memory_format=memory_format
    )


def randomized(module):
    """module with random affine parameters (not torch's ones and zeros) and,
    for BatchNorm, random running statistics."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(random(*p.shape, dtype=p.dtype))
        if getattr(module, "running_var", None) is not None:
            module.running_mean.copy_(random(*module.running_mean.shape))
            module.running_var.copy_(random(*module.running_var.shape).abs().add(0.5))
    return module


def assert_equal_states(actual_state, expected_state, keys=None):
    """Same keys and values (or, given `keys`, the same values under those keys)."""
    if keys is None:
        assert list(actual_state) == list(expected_state)
    for name in keys or expected_state:
        assert torch.equal(actual_state[name], expected_state[name]), name


def assert_same_state(actual, expected, keys=None):
    assert_equal_states(actual.state_dict(), expected.state_dict(), keys)


def fx_state_keys(module, training):
    """What a GraphModule traced from `module` keeps: the parameters and
    buffers its graph reads (eval reads no num_batches_tracked)."""
    return [k for k in module.state_dict() if training or not k.endswith("num_batches_tracked")]


def graph_ops(scripted):
    """The layernorm_ext ops a scripted or traced module's graph calls."""
    return {n.kind() for n in scripted.inlined_graph.nodes() if n.kind().startswith("layernorm_ext::")}


# (class name, arguments, input shape): the class is in layernorm_ext and,
# the module ours replaces, in torch.nn.
ROW_NORMS = [
    ("LayerNorm", dict(normalized_shape=8), (3, 5, 8)),
    ("LayerNorm", dict(normalized_shape=(5, 8), bias=False), (3, 5, 8)),
    ("LayerNorm", dict(normalized_shape=8, elementwise_affine=False), (4, 8)),
    ("RMSNorm", dict(normalized_shape=8), (3, 5, 8)),
    ("RMSNorm", dict(normalized_shape=[5, 8], eps=1e-3), (3, 5, 8)),
    ("RMSNorm", dict(normalized_shape=8, elementwise_affine=False), (4, 8)),
]

BATCH_NORMS = [
    ("BatchNorm1d", dict(num_features=4), (6, 4)),
    ("BatchNorm1d", dict(num_features=4, momentum=None), (3, 4, 5)),
    ("BatchNorm2d", dict(num_features=3), (2, 3, 4, 5)),
    ("BatchNorm2d", dict(num_features=3, momentum=None), (2, 3, 4, 5)),
    ("BatchNorm2d", dict(num_features=3, track_running_stats=False), (2, 3, 4, 5)),
    ("BatchNorm2d", dict(num_features=3, affine=False), (2, 3, 4, 5)),
    ("BatchNorm3d", dict(num_features=2, momentum=0.3), (2, 2, 3, 4, 5)),
]


def case_id(case):
    name, kwargs, _ = case
    return name + "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"


def make_pair(case):
    """(ours, torch's) with the same random parameters and buffers."""
    name, kwargs, _ = case
    ours = randomized(getattr(layernorm_ext, name)(**kwargs))
    theirs = getattr(torch.nn, name)(**kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def steps(module, shape, training_steps=3):
    """Outputs of `training_steps` calls in training mode and one in eval, and
    the module's state after each, on fresh random inputs (seeded, so that two
    modules see the same ones)."""
    generator_state = torch.get_rng_state()
    results = []
    for step in range(training_steps + 1):
        module.train(step < training_steps)
        output = module(random(*shape))
        results.append((output, {k: v.clone() for k, v in module.state_dict().items()}))
    torch.set_rng_state(generator_state)
    return results


def assert_same_steps(actual, expected):
    for (out_a, state_a), (out_e, state_e) in zip(actual, expected, strict=True):
        assert torch.equal(out_a, out_e)
        assert_equal_states(state_a, state_e)


def assert_close_steps(actual, expected):
    """Ours against torch's: to rounding, the counters exactly."""
    for (out_a, state_a), (out_e, state_e) in zip(actual, expected, strict=True):
        torch.testing.assert_close(out_a, out_e, rtol=1e-5, atol=1e-5)
        assert list(state_a) == list(state_e)
        for name in state_e:
            torch.testing.assert_close(state_a[name], state_e[name], rtol=1e-5, atol=1e-6)


# --- torch.jit.script -------------------------------------------------------


@pytest.mark.parametrize("case", ROW_NORMS, ids=case_id)
def test_script_row_norm(case):
    ours, theirs = make_pair(case)
    scripted = torch.jit.script(ours)
    op = "rms_norm_forward" if case[0] == "RMSNorm" else "layer_norm_forward"
    assert graph_ops(scripted) == {f"layernorm_ext::{op}"}
    assert_same_state(scripted, theirs)
    for dtype in (torch.float32, torch.float64):
        x = random(*case[2], dtype=dtype).requires_grad_()
        expected = ours.to(dtype)(x)
        actual = scripted.to(dtype)(x)
        assert torch.equal(actual, expected)
        torch.testing.assert_close(actual, theirs.to(dtype)(x))
        dy = random(*case[2], dtype=dtype)
        (grad_actual,) = torch.autograd.grad(actual, x, dy)
        (grad_expected,) = torch.autograd.grad(expected, x, dy)
        assert torch.equal(grad_actual, grad_expected)


def test_script_rms_norm_default_eps_follows_dtype():
    """eps=None: the machine epsilon of the computation dtype of each call's input."""
    scripted = torch.jit.script(layernorm_ext.RMSNorm(16, elementwise_affine=False))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = random(5, 16, dtype=dtype).mul(1e-4)
        assert torch.equal(scripted(x), layernorm_ext.rms_norm(x, (16,)))
        torch.testing.assert_close(scripted(x), F.rms_norm(x, (16,)))


@pytest.mark.parametrize("case", BATCH_NORMS, ids=case_id)
def test_script_batch_norm(case):
    ours, theirs = make_pair(case)
    scripted = torch.jit.script(copy.deepcopy(ours))
    assert graph_ops(scripted) == {"layernorm_ext::batch_norm_forward"}
    assert_same_state(scripted, theirs)
    expected = steps(ours, case[2])
    assert_same_steps(steps(scripted, case[2]), expected)
    assert_close_steps(expected, steps(theirs, case[2]))


def test_script_batch_norm_checks():
    """The eager module's errors, raised before any buffer or counter changes."""
    scripted = torch.jit.script(layernorm_ext.BatchNorm2d(3))
    with pytest.raises(torch.jit.Error, match=r"expected 4D input \(got 3D input\)"):
        scripted(random(2, 3, 4))
    assert_same_state(scripted, torch.nn.BatchNorm2d(3))
    scripted = torch.jit.script(layernorm_ext.BatchNorm2d(3, eps=0.0))
    with pytest.raises(torch.jit.Error, match="eps must be positive during training"):
        scripted(random(2, 3, 4, 4))
    assert_same_state(scripted, torch.nn.BatchNorm2d(3))


def test_script_save_load():
    model = torch.nn.Sequential(randomized(layernorm_ext.RMSNorm(8)), randomized(layernorm_ext.BatchNorm1d(8)))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(copy.deepcopy(model)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert graph_ops(loaded) == {"layernorm_ext::rms_norm_forward", "layernorm_ext::batch_norm_forward"}
    assert_same_steps(steps(loaded, (5, 8)), steps(model, (5, 8)))


def test_script_module_containing_ours():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), layernorm_ext.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(8)
    )
    model(random(2, 3, 6, 6))
    model.append(layernorm_ext.LayerNorm(8)).append(layernorm_ext.RMSNorm(8))
    scripted = torch.jit.script(copy.deepcopy(model))
    assert graph_ops(scripted) == {
        "layernorm_ext::batch_norm_forward",
        "layernorm_ext::layer_norm_forward",
        "layernorm_ext::rms_norm_forward",
    }
    assert_same_steps(steps(scripted, (2, 3, 6, 6)), steps(model, (2, 3, 6, 6)))


# --- torch.jit.trace --------------------------------------------------------


@pytest.mark.parametrize("case", ROW_NORMS + BATCH_NORMS, ids=case_id)
@pytest.mark.parametrize("training", [True, False])
def test_trace(case, training):
    ours, _ = make_pair(case)
    ours.train(training)
    traced = torch.jit.trace(copy.deepcopy(ours), random(*case[2]), check_trace=False)
    assert graph_ops(traced)
    # Tracing ran one call, which counted in training: start from one state.
    traced.load_state_dict(ours.state_dict())
    # (A trace records one mode, and momentum=None's factor as a constant.)
    for _ in range(1 if getattr(ours, "momentum", 0.1) is None else 3):
        x = random(*case[2])
        assert torch.equal(traced(x), ours(x))
        assert_same_state(traced, ours)


def test_batch_norm_dim_errors_match_torch():
    for name, dims in (("BatchNorm1d", (2, 3)), ("BatchNorm2d", (4,)), ("BatchNorm3d", (5,))):
        for wrong in sorted({1, 2, 3, 4, 5, 6} - set(dims)):
            x = random(*([2] * wrong))
            with pytest.raises(ValueError) as theirs:
                getattr(torch.nn, name)(2)(x)
            with pytest.raises(ValueError) as ours:
                getattr(layernorm_ext, name)(2)(x)
            assert str(ours.value) == str(theirs.value)


# --- torch.fx.symbolic_trace ------------------------------------------------


def called_functions(graph_module):
    return {n.target for n in graph_module.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("case", ROW_NORMS, ids=case_id)
def test_fx_row_norm(case):
    ours, _ = make_pair(case)
    traced = torch.fx.symbolic_trace(ours)
    wrapper = layernorm_ext.rms_norm if case[0] == "RMSNorm" else layernorm_ext.layer_norm
    assert wrapper in called_functions(traced)
    # The traced graph does not know the dtype: RMSNorm's default eps is
    # taken when it runs.
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = random(*case[2], dtype=dtype)
        assert torch.equal(traced.to(dtype)(x), ours.to(dtype)(x))


@pytest.mark.parametrize("case", BATCH_NORMS, ids=case_id)
@pytest.mark.parametrize("training", [True, False])
def test_fx_batch_norm(case, training):
    ours, _ = make_pair(case)
    traced = torch.fx.symbolic_trace(copy.deepcopy(ours).train(training))
    # Calls of our functions, not their insides (the op, copies into buffers).
    called = called_functions(traced)
    assert called and all(f.__module__ == "layernorm_ext.batch_norm" for f in called)
    # fx records the mode it traced in, as it does for any Python branch.
    keys = fx_state_keys(ours, training and case[1].get("track_running_stats", True))
    for _ in range(3):
        x = random(*case[2])
        assert torch.equal(traced(x), ours.train(training)(x))
        assert_same_state(traced, ours, keys)
    with pytest.raises(ValueError, match=r"expected .*D input \(got 6D input\)"):
        traced(random(1, case[1]["num_features"], 1, 1, 1, 2))


class FunctionalBlock(torch.nn.Module):
    """A pre-norm block written with the functional wrappers, through the package."""

    def __init__(self, features=8):
        super().__init__()
        self.weight = torch.nn.Parameter(random(features))
        self.bias = torch.nn.Parameter(random(features))
        self.register_buffer("running_mean", random(features))
        self.register_buffer("running_var", random(features).abs().add(0.5))

    def forward(self, x, residual):
        h = layernorm_ext.layer_norm(x, (x.shape[-1],), self.weight, self.bias)
        h = layernorm_ext.rms_norm(h, (8,))
        h, s = layernorm_ext.fused_add_rms_norm(h, residual, (8,), self.weight)
        h, s = layernorm_ext.fused_add_layer_norm(h, s, (8,), self.weight, None, 1e-3)
        h = layernorm_ext.batch_norm(
            h, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.2
        )
        return h + s


def test_fx_functional_wrappers():
    block = FunctionalBlock()
    traced = torch.fx.symbolic_trace(copy.deepcopy(block))
    assert called_functions(traced) >= {
        layernorm_ext.layer_norm,
        layernorm_ext.rms_norm,
        layernorm_ext.fused_add_rms_norm,
        layernorm_ext.fused_add_layer_norm,
        layernorm_ext.batch_norm,
    }
    for dtype in (torch.float32, torch.float64):
        traced.to(dtype), block.to(dtype)
        for _ in range(2):
            x, residual = random(6, 8, dtype=dtype), random(6, 8, dtype=dtype)
            assert torch.equal(traced(x, residual), block(x, residual))
            assert_same_state(traced, block)


def test_fx_model_containing_ours():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), layernorm_ext.RMSNorm(8), layernorm_ext.BatchNorm1d(8, momentum=None)
    )
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    for _ in range(3):
        x = random(5, 8)
        assert torch.equal(traced(x), model(x))
        assert_same_state(traced, model)


# --- memory formats ---------------------------------------------------------


def sliced_channels_last(n, c, h, w):
    return random(n, c, h, w + 2, memory_format=CL)[..., 1:-1]


# (input, number of normalized trailing dims)
LAYOUTS = {
    "channels_last": (lambda: random(2, 3, 4, 6, memory_format=CL), 1),
    "channels_last_2dims": (lambda: random(2, 3, 4, 6, memory_format=CL), 2),
    "channels_last_3dims": (lambda: random(2, 3, 4, 6, memory_format=CL), 3),
    "channels_last_3d": (lambda: random(2, 3, 4, 5, 6, memory_format=CL3D), 1),
    "channels_last_3d_2dims": (lambda: random(2, 3, 4, 5, 6, memory_format=CL3D), 2),
    "sliced_channels_last": (lambda: sliced_channels_last(2, 3, 4, 6), 1),
    "contiguous": (lambda: random(2, 3, 4, 6), 1),
    "transposed": (lambda: random(6, 4, 3).transpose(0, 2), 1),
}


def grad_outputs(shape):
    """Gradients in the layouts the tests feed to backward: contiguous, and the
    input's channels-last format where it has one."""
    grads = [random(*shape)]
    if len(shape) == 4:
        grads.append(random(*shape, memory_format=CL))
    if len(shape) == 5:
        grads.append(random(*shape, memory_format=CL3D))
    return grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_memory_format(layout, with_weight, dtype):
    make, ndims = LAYOUTS[layout]
    x = make().to(dtype).requires_grad_()
    normalized_shape = tuple(x.shape[x.dim() - ndims :])
    weight = random(*normalized_shape, dtype=dtype) if with_weight else None
    y = layernorm_ext.rms_norm(x, normalized_shape, weight)
    expected = F.rms_norm(x, normalized_shape, weight)
    assert y.stride() == expected.stride()
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.double()
    reference = F.rms_norm(x64, normalized_shape, w64)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), reference, rtol=tolerance, atol=tolerance)
    for dy in grad_outputs(x.shape):
        dy = dy.to(dtype)
        (grad,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        (expected_grad,) = torch.autograd.grad(expected, x, dy, retain_graph=True)
        assert grad.stride() == expected_grad.stride()
        (reference_grad,) = torch.autograd.grad(reference, x64, dy.double(), retain_graph=True)
        torch.testing.assert_close(grad.double(), reference_grad, rtol=tolerance, atol=tolerance * 10)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_norm_memory_format(layout):
    make, ndims = LAYOUTS[layout]
    x = make().requires_grad_()
    normalized_shape = tuple(x.shape[x.dim() - ndims :])
    weight, bias = random(*normalized_shape), random(*normalized_shape)
    y = layernorm_ext.layer_norm(x, normalized_shape, weight, bias)
    expected = F.layer_norm(x, normalized_shape, weight, bias)
    assert y.stride() == expected.stride()
    torch.testing.assert_close(y, expected)
    for dy in grad_outputs(x.shape):
        (grad,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        (expected_grad,) = torch.autograd.grad(expected, x, dy, retain_graph=True)
        assert grad.stride() == expected_grad.stride()
        torch.testing.assert_close(grad, expected_grad)


def test_rms_norm_module_channels_last():
    ours = randomized(layernorm_ext.RMSNorm(6))
    theirs = torch.nn.RMSNorm(6)
    theirs.load_state_dict(ours.state_dict())
    x = random(2, 3, 4, 6, memory_format=CL)
    y = ours(x)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    torch.testing.assert_close(y, theirs(x))
    assert torch.jit.script(ours)(x).stride() == y.stride()


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "sliced_channels_last", "transposed"])
def test_rms_norm_fake_strides_match(layout):
    """The fake kernels give the real ops' strides (torch.compile plans memory with them)."""
    make, ndims = LAYOUTS[layout]
    x = make()
    normalized_shape = list(x.shape[x.dim() - ndims :])
    weight = random(*normalized_shape)
    dy = random(*x.shape).contiguous(memory_format=suggest_memory_format(x))
    ops = torch.ops.layernorm_ext
    output, rstd = ops.rms_norm_forward(x, normalized_shape, weight, 1e-6)
    grad_input, _ = ops.rms_norm_backward(dy, x, normalized_shape, rstd, weight, [True, True])
    with FakeTensorMode() as mode:
        fx, fw, fdy = mode.from_tensor(x), mode.from_tensor(weight), mode.from_tensor(dy)
        fake_output, fake_rstd = ops.rms_norm_forward(fx, normalized_shape, fw, 1e-6)
        fake_grad, _ = ops.rms_norm_backward(fdy, fx, normalized_shape, fake_rstd, fw, [True, True])
    assert fake_output.stride() == output.stride()
    assert fake_grad.stride() == grad_input.stride()


@pytest.mark.parametrize("memory_format,shape", [(CL, (2, 3, 4, 6)), (CL3D, (2, 3, 2, 4, 6))])
@pytest.mark.parametrize("ndims", [1, 2])
def test_opcheck_channels_last(memory_format, shape, ndims):
    ops = torch.ops.layernorm_ext
    x = random(*shape, memory_format=memory_format).requires_grad_()
    normalized_shape = list(shape[len(shape) - ndims :])
    weight = random(*normalized_shape).requires_grad_()
    bias = random(*normalized_shape).requires_grad_()
    torch.library.opcheck(ops.rms_norm_forward, (x, normalized_shape, weight, 1e-6))
    torch.library.opcheck(ops.layer_norm_forward, (x, normalized_shape, weight, bias, 1e-5))
    _, rstd = ops.rms_norm_forward(x.detach(), normalized_shape, weight.detach(), 1e-6)
    for dy in (random(*shape), random(*shape, memory_format=memory_format)):
        torch.library.opcheck(
            ops.rms_norm_backward, (dy, x.detach(), normalized_shape, rstd, weight.detach(), [True, True])
        )

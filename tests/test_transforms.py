"""Forward-mode AD and torch.func transforms (grad, vjp, jvp, jacrev, jacfwd,
hessian, vmap, per-sample gradients) through every op, against torch's own
functions on the same float64 data.

Each case is an op of the registry on one of its samples: every op, with and
without affine parameters, BatchNorm in training and eval.
"""

import functools
import operator

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import layernorm_ext
from layernorm_ext.op_db import make_tensor, op_info


class Case:
    """An op of the registry on one float64 sample of `shape` (make_sample
    `options`), as a function of the tensors that sample differentiates
    (BatchNorm's running statistics stay constants): `ours` (our functional)
    and `ref` (torch's) of them; `tensors()` makes fresh ones."""

    def __init__(self, name, op, shape, **options):
        self.name, self.info, self.shape, self.options = name, op_info(op), shape, options
        self.template = self._sample()
        self.shapes = tuple(t.shape for t in self.tensors())
        self.ours = self._function(self.info.op)
        self.ref = self._function(self.info.ref)

    def __repr__(self):
        return self.name

    def _sample(self):
        return self.info.make_sample(self.shape, "cpu", torch.float64, requires_grad=True, **self.options)

    def _function(self, fn):
        def call(*tensors):
            replacements = iter(tensors)
            sample = self.template.map_tensors(lambda t: next(replacements) if t.requires_grad else t)
            return fn(*sample.args)

        return call

    def tensors(self):
        return tuple(t.detach() for t in self._sample().tensors() if t.requires_grad)


CASES = [
    Case("layer_norm", "layer_norm", (3, 5)),
    Case("layer_norm_2d_no_affine", "layer_norm", (2, 2, 3), norm_dims=2, affine=False),
    Case("layer_norm_weight_only", "layer_norm", (3, 4), affine="weight"),
    Case("rms_norm", "rms_norm", (3, 5), eps=1e-6),
    Case("rms_norm_no_weight", "rms_norm", (2, 2, 3), norm_dims=2, affine=False),
    Case("fused_add_layer_norm", "fused_add_layer_norm", (3, 5)),
    Case("fused_add_rms_norm", "fused_add_rms_norm", (3, 5)),
    Case("batch_norm_train", "batch_norm", (4, 3, 2), training=True, running_stats=False),
    Case("batch_norm_train_no_affine_2d", "batch_norm", (5, 3), affine=False, training=True,
         running_stats=False),
    Case("batch_norm_eval", "batch_norm", (4, 3, 2), training=False),
    # A 1-D input has no channels (torch accepts only an empty one, and no
    # [0]-shaped parameters).
    Case("batch_norm_train_1d_empty", "batch_norm", (0,), affine=False, training=True,
         running_stats=False),
    Case("batch_norm_eval_1d_empty", "batch_norm", (0,), affine=False, training=False),
]


@pytest.fixture(autouse=True)
def _no_vmap_fallback():
    """Every op has a batching rule: vmap's slow per-sample fallback (which
    would also give right answers) raises instead."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_close(mine, theirs):
    mine, theirs = _flat(mine), _flat(theirs)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ---- forward-mode AD ---------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_ad_matches_torch(case, requires_grad):
    """Dual tensors carry the tangent through, whether or not the primals also
    require grad (without a forward formula the tangent is dropped silently in
    the first case and the call raises in the second)."""
    primals = [t.requires_grad_(requires_grad) for t in case.tensors()]
    tangents = case.tensors()
    results = []
    for fn in (case.ours, case.ref):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            outputs = _flat(fn(*duals))
            results.append([fwAD.unpack_dual(o) for o in outputs])
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine.primal, theirs.primal, rtol=1e-9, atol=1e-10)
        assert mine.tangent is not None
        torch.testing.assert_close(mine.tangent, theirs.tangent, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_ad_with_a_tangent_on_one_argument(case):
    """A tangent on the last argument only (the bias, the weight, or the input)."""
    primals = case.tensors()
    tangent = make_tensor(case.shapes[-1], torch.float64)

    def tangents_of(fn):
        with fwAD.dual_level():
            args = list(primals)
            args[-1] = fwAD.make_dual(primals[-1], tangent)
            return [fwAD.unpack_dual(o).tangent for o in _flat(fn(*args))]

    for mine, theirs in zip(tangents_of(case.ours), tangents_of(case.ref)):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_func_jvp_and_jacfwd_match_torch(case):
    primals = case.tensors()
    tangents = case.tensors()
    _assert_close(jvp(case.ours, primals, tangents)[1], jvp(case.ref, primals, tangents)[1])
    argnums = tuple(range(len(primals)))
    _assert_close(
        tuple(torch.cat([j.flatten() for j in _flat(jac)]) for jac in _flat(jacfwd(case.ours, argnums)(*primals))),
        tuple(torch.cat([j.flatten() for j in _flat(jac)]) for jac in _flat(jacfwd(case.ref, argnums)(*primals))),
    )


# ---- reverse mode under torch.func ------------------------------------------


def _scalar(fn):
    """A scalar function of fn's outputs that depends on all of them unevenly.
    (Tensors only: torch's hessian fails on a Python number plus the sum of
    an empty tensor.)"""

    def loss(*args):
        terms = []
        for i, out in enumerate(_flat(fn(*args))):
            weights = torch.arange(i, i + out.numel(), dtype=out.dtype).view(out.shape).sin()
            terms.append((out * weights).sum())
        return functools.reduce(operator.add, terms)

    return loss


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_func_grad_and_vjp_match_torch(case):
    args = case.tensors()
    argnums = tuple(range(len(args)))
    _assert_close(grad(_scalar(case.ours), argnums)(*args), grad(_scalar(case.ref), argnums)(*args))
    cotangents = tuple(make_tensor(o.shape, torch.float64) for o in _flat(case.ref(*args)))
    _, vjp_ours = vjp(case.ours, *args)
    _, vjp_ref = vjp(case.ref, *args)
    cot = cotangents if len(cotangents) > 1 else cotangents[0]
    _assert_close(vjp_ours(cot), vjp_ref(cot))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_func_jacrev_matches_torch(case):
    args = case.tensors()
    argnums = tuple(range(len(args)))
    mine, theirs = jacrev(case.ours, argnums)(*args), jacrev(case.ref, argnums)(*args)
    for m, t in zip(_flat(mine), _flat(theirs)):
        _assert_close(m, t)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_func_hessian_matches_torch(case):
    """hessian is jacfwd(jacrev): forward mode through the backward ops."""
    args = case.tensors()
    _assert_close(hessian(_scalar(case.ours))(*args), hessian(_scalar(case.ref))(*args))
    # And reverse over reverse.
    _assert_close(
        jacrev(jacrev(_scalar(case.ours)))(*args), jacrev(jacrev(_scalar(case.ref)))(*args)
    )


# ---- vmap ----------------------------------------------------------------------


# (case, which arguments are vmapped): the first only, every one (per-model
# parameters: ensembling), or the parameters only.
VMAP_CASES = [
    (case, batched)
    for case in CASES
    for batched in ("input", "all", "params")
    if batched == "input" or len(case.shapes) > 1
]


@pytest.mark.parametrize("case, batched", VMAP_CASES, ids=lambda v: repr(v) if isinstance(v, Case) else v)
def test_vmap_matches_torch(case, batched):
    """vmap over some arguments, at dim 1 for tensors of 2 or more dims."""
    size = 4
    args = case.tensors()
    first = 0 if batched in ("input", "all") else 1
    last = 1 if batched == "input" else len(args)
    in_dims = tuple(
        (1 if args[i].dim() >= 2 else 0) if first <= i < last else None for i in range(len(args))
    )
    batched_args = tuple(
        make_tensor((*a.shape[:d], size, *a.shape[d:]), torch.float64) if d is not None else a
        for a, d in zip(args, in_dims)
    )
    _assert_close(vmap(case.ours, in_dims)(*batched_args), vmap(case.ref, in_dims)(*batched_args))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gradcheck_forward_ad_and_batched(case):
    """torch's own checks: forward-mode AD, batched (vmap) gradients, and
    forward over reverse."""
    args = tuple(t.requires_grad_() for t in case.tensors())
    assert torch.autograd.gradcheck(
        case.ours, args, check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(
        case.ours, args, check_fwd_over_rev=True, check_rev_over_rev=True, check_batched_grad=True
    )


# ---- per-sample gradients of a model --------------------------------------------


def _model(norm_kind, ours):
    lib = layernorm_ext if ours else torch.nn
    norm = {
        "layer_norm": lambda: lib.LayerNorm(6),
        "rms_norm": lambda: lib.RMSNorm(6),
        "batch_norm": lambda: lib.BatchNorm1d(6, track_running_stats=False),
    }[norm_kind]
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), norm(), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


@pytest.mark.parametrize("norm_kind", ["layer_norm", "rms_norm", "batch_norm"])
def test_per_sample_gradients_match_torch(norm_kind):
    """vmap(grad(functional_call)): the per-sample-gradient recipe of torch.func."""
    x = torch.randn(8, 3, 4, dtype=torch.float64)  # 8 samples, each a batch of 3
    target = torch.randn(8, 3, 2, dtype=torch.float64)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xs, ys):
            return F.mse_loss(functional_call(model, p, (xs,)), ys)

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    mine, theirs = per_sample(_model(norm_kind, True)), per_sample(_model(norm_kind, False))
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-9, atol=1e-10)


# ---- tangents of the statistics, other dtypes, modules ----------------------------


def _statistics(x, dims, eps=1e-5):
    return x.mean(dims), (x.var(dims, unbiased=False) + eps).rsqrt()


def test_statistics_tangents_and_gradients():
    """The ops' returned statistics carry tangents and gradients too (aten's
    native_layer_norm gives them zero tangents): against the same statistics
    written in torch ops."""
    x, w, b, dx, dw, db = (make_tensor(s, torch.float64) for s in ((6, 5), (5,), (5,)) * 2)
    ops = torch.ops.layernorm_ext
    cases = [
        (lambda x: ops.layer_norm_forward(x, [5], w, b, 1e-5)[1:], lambda x: _statistics(x, -1)),
        (lambda x: ops.rms_norm_forward(x, [5], w, 1e-5)[1], lambda x: (x.pow(2).mean(-1) + 1e-5).rsqrt()),
        (lambda x: ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)[1:3],
         lambda x: _statistics(x, 0)),
        (lambda x: ops.fused_add_layer_norm_forward(x, x.flip(0), [5], w, b, 1e-5)[1:],
         lambda x: (x + x.flip(0), *_statistics(x + x.flip(0), -1))),
    ]
    for mine, ref in cases:
        _assert_close(jvp(mine, (x,), (dx,))[1], jvp(ref, (x,), (dx,))[1])
        _assert_close(jacrev(mine)(x), jacrev(ref)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("layer_norm", "rms_norm", "batch_norm_train")], ids=repr)
def test_forward_ad_in_other_dtypes(case, dtype):
    """Tangents have the primals' dtypes and match the float64 ones to the
    dtype's rounding (half inputs with float32 parameters, as torch allows)."""
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    primals64, tangents64 = case.tensors(), case.tensors()

    def low(t, i):
        return t.to(dtype if i == 0 else torch.float32)

    with fwAD.dual_level():
        duals = [fwAD.make_dual(low(p, i), low(t, i)) for i, (p, t) in enumerate(zip(primals64, tangents64))]
        out = fwAD.unpack_dual(_flat(case.ours(*duals))[0])
    expected = jvp(case.ref, tuple(low(p, i).double() for i, p in enumerate(primals64)),
                   tuple(low(t, i).double() for i, t in enumerate(tangents64)))[1]
    assert out.tangent.dtype == dtype
    torch.testing.assert_close(out.tangent.double(), _flat(expected)[0], rtol=tolerance, atol=tolerance)


def test_batch_norm_module_under_forward_ad_updates_running_stats_like_torch():
    ours, theirs = layernorm_ext.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    x, dx = make_tensor((4, 3, 2, 2), torch.float64), make_tensor((4, 3, 2, 2), torch.float64)
    results = []
    for module in (ours, theirs):
        with fwAD.dual_level():
            results.append(fwAD.unpack_dual(module(fwAD.make_dual(x, dx))))
    _assert_close((results[0].primal, results[0].tangent), (results[1].primal, results[1].tangent))
    _assert_close((ours.running_mean, ours.running_var, ours.num_batches_tracked),
                  (theirs.running_mean, theirs.running_var, theirs.num_batches_tracked))


def test_ensemble_of_models_with_stacked_parameters():
    """torch.func.stack_module_state + vmap(functional_call): several models,
    each with its own norm parameters, in one call."""
    models = [_model("layer_norm", True) for _ in range(3)]
    refs = [_model("layer_norm", False) for _ in range(3)]
    for mine, ref in zip(models, refs):
        for p in list(mine.parameters()) + list(ref.parameters()):
            p.data.normal_()
        ref.load_state_dict(mine.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)

    def run(ms):
        params, buffers = torch.func.stack_module_state(ms)
        base = ms[0]
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    torch.testing.assert_close(run(models), run(refs), rtol=1e-9, atol=1e-10)


# ---- compiled autograd -----------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "layer_norm", "rms_norm", "fused_add_layer_norm", "batch_norm_train", "batch_norm_eval")], ids=repr)
def test_compiled_autograd_gives_eager_gradients(case):
    """torch._dynamo's compiled autograd traces the ops' backward Nodes."""
    from torch._dynamo import compiled_autograd

    def gradients(compiled):
        torch._dynamo.reset()
        args = [t.clone().requires_grad_() for t in tensors]
        loss = _scalar(case.ours)(*args)
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
                loss.backward()
        else:
            loss.backward()
        return tuple(a.grad for a in args)

    tensors = case.tensors()
    _assert_close(gradients(True), gradients(False))


def test_compiled_autograd_through_a_gradient_penalty():
    """A loss that holds a gradient (create_graph) puts the backward ops'
    own backward Nodes into the graph compiled autograd compiles."""
    from torch._dynamo import compiled_autograd

    def weight_grads(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        norm = layernorm_ext.LayerNorm(5).double()
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        (grad_x,) = torch.autograd.grad(norm(x).sin().sum(), x, create_graph=True)
        loss = grad_x.pow(2).sum()
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
                loss.backward()
        else:
            loss.backward()
        return norm.weight.grad, norm.bias.grad, x.grad

    _assert_close(weight_grads(True), weight_grads(False))


# ---- BatchNorm's running statistics under the transforms ---------------------------
#
# In training the running statistics update as torch's do under every
# transform: once, with the batch's own statistics (grad, vjp, jvp, and the
# transforms that run the function once, batched: jacrev, jacfwd, hessian),
# per sample when vmap batches them, and vmap over the input with unbatched
# running statistics raises torch's error.


def _running_stats():
    return make_tensor((3,), torch.float64), make_tensor((3,), torch.float64).abs_().add_(0.5)


def _batch_norm_train(bn, weight):
    def call(x, running_mean, running_var):
        return bn(x, running_mean, running_var, weight, None, True, 0.3, 1e-5)

    return call


def _stacked(stats, size=2):
    """Per-sample copies of the running statistics, for vmap to batch."""
    return tuple(s.expand(size, *s.shape).clone() for s in stats)


# Each takes (bn, x, weight, samples, running_mean, running_var), with bn
# our batch_norm or torch's, and returns (results, the buffers it updated).
RUNNING_STATS_UNDER = {
    "grad": lambda bn, x, w, xs, rm, rv: (
        grad(lambda x: _batch_norm_train(bn, w)(x, rm, rv).sin().sum())(x), (rm, rv)),
    "vjp": lambda bn, x, w, xs, rm, rv: (
        vjp(lambda x: _batch_norm_train(bn, w)(x, rm, rv), x)[1](x.cos()), (rm, rv)),
    "jvp": lambda bn, x, w, xs, rm, rv: (
        jvp(lambda x: _batch_norm_train(bn, w)(x, rm, rv), (x,), (x.cos(),)), (rm, rv)),
    "jacrev": lambda bn, x, w, xs, rm, rv: (
        jacrev(lambda x: _batch_norm_train(bn, w)(x, rm, rv))(x), (rm, rv)),
    "jacfwd": lambda bn, x, w, xs, rm, rv: (
        jacfwd(lambda x: _batch_norm_train(bn, w)(x, rm, rv))(x), (rm, rv)),
    "hessian": lambda bn, x, w, xs, rm, rv: (
        hessian(lambda x: _batch_norm_train(bn, w)(x, rm, rv).sin().sum())(x), (rm, rv)),
    "grad_of_grad": lambda bn, x, w, xs, rm, rv: (
        grad(lambda x: grad(lambda x: _batch_norm_train(bn, w)(x, rm, rv).sin().sum())(x).pow(2).sum())(x),
        (rm, rv)),
    "grad_with_the_stats_as_inputs": lambda bn, x, w, xs, rm, rv: (
        grad(lambda x, m, v: _batch_norm_train(bn, w)(x, m, v).sin().sum())(x, rm, rv), (rm, rv)),
    "vmap_over_the_weight": lambda bn, x, w, xs, rm, rv: (
        vmap(lambda w: _batch_norm_train(bn, w)(x, rm, rv))(torch.stack([w, w.cos()])), (rm, rv)),
    "vmap_over_the_input_and_the_stats": lambda bn, x, w, xs, rm, rv: (
        lambda stats: (vmap(_batch_norm_train(bn, w))(xs, *stats), stats))(_stacked((rm, rv))),
    "vmap_over_the_stats": lambda bn, x, w, xs, rm, rv: (
        lambda stats: (vmap(lambda m, v: _batch_norm_train(bn, w)(x, m, v))(*stats), stats))(
            _stacked((rm, rv))),
    "vmap_of_grad_over_the_input_and_the_stats": lambda bn, x, w, xs, rm, rv: (
        lambda stats: (vmap(grad(lambda x, m, v: _batch_norm_train(bn, w)(x, m, v).sin().sum()))(
            xs, *stats), stats))(_stacked((rm, rv))),
    "vmap_over_the_input_in_eval": lambda bn, x, w, xs, rm, rv: (
        vmap(lambda x: bn(x, rm, rv, w, None, False, 0.3, 1e-5))(xs), (rm, rv)),
    "vmap_without_running_stats": lambda bn, x, w, xs, rm, rv: (
        vmap(lambda x: bn(x, None, None, w, None, True, 0.3, 1e-5))(xs), (rm, rv)),
}


@pytest.mark.parametrize("transform", list(RUNNING_STATS_UNDER))
def test_batch_norm_running_stats_under_transforms_match_torch(transform):
    x, w = make_tensor((4, 3, 2), torch.float64), make_tensor((3,), torch.float64)
    samples = make_tensor((2, 4, 3, 2), torch.float64)
    stats = _running_stats()
    results, buffers = [], []
    for bn in (layernorm_ext.batch_norm, F.batch_norm):
        result, updated = RUNNING_STATS_UNDER[transform](bn, x, w, samples, *(s.clone() for s in stats))
        results.append(result)
        buffers.append(updated)
    _assert_close(tuple(_flat(results[0])), tuple(_flat(results[1])))
    _assert_close(buffers[0], buffers[1])


UNBATCHED_RUNNING_STATS_UNDER_VMAP = {
    "vmap": lambda f, xs: vmap(f)(xs),
    "vmap_of_grad": lambda f, xs: vmap(grad(lambda x: f(x).sin().sum()))(xs),
    "grad_of_vmap": lambda f, xs: grad(lambda xs: vmap(f)(xs).sin().sum())(xs),
    "jacrev_of_vmap": lambda f, xs: jacrev(vmap(f))(xs),
}


@pytest.mark.parametrize("transform", list(UNBATCHED_RUNNING_STATS_UNDER_VMAP))
def test_vmap_over_the_input_with_unbatched_running_stats_raises_torch_error(transform):
    xs, w = make_tensor((2, 4, 3, 2), torch.float64), make_tensor((3,), torch.float64)
    stats = _running_stats()
    messages = []
    for bn in (layernorm_ext.batch_norm, F.batch_norm):
        running_mean, running_var = (s.clone() for s in stats)
        with pytest.raises(RuntimeError) as error:
            UNBATCHED_RUNNING_STATS_UNDER_VMAP[transform](
                lambda x: _batch_norm_train(bn, w)(x, running_mean, running_var), xs)
        messages.append(str(error.value))
        assert torch.equal(running_mean, stats[0]) and torch.equal(running_var, stats[1])
    assert messages[0] == messages[1]
    assert "Batch norm got a batched tensor as input while the running_mean" in messages[0]


def _modules(**options):
    torch.manual_seed(3)
    ours, theirs = layernorm_ext.BatchNorm1d(3, **options).double(), torch.nn.BatchNorm1d(3, **options).double()
    for module in (ours, theirs):
        torch.nn.init.normal_(module.weight)
        if module.running_mean is not None:
            module.running_mean.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _buffers(module):
    return {name: b.clone() for name, b in module.named_buffers()}


def test_batch_norm_module_functional_call_under_grad_matches_torch():
    """grad of functional_call with the buffers passed in: the buffers given
    are updated (running statistics and counter), as torch's."""
    x = make_tensor((4, 3, 2), torch.float64)
    results = []
    for module in _modules():
        params, buffers = dict(module.named_parameters()), _buffers(module)
        grads = grad(lambda p, b: functional_call(module, (p, b), (x,)).sin().sum())(params, buffers)
        results.append((grads, buffers))
    (grads, buffers), (grads_ref, buffers_ref) = results
    assert grads.keys() == grads_ref.keys() and buffers.keys() == buffers_ref.keys()
    _assert_close(tuple(grads.values()), tuple(grads_ref.values()))
    _assert_close(tuple(buffers.values()), tuple(buffers_ref.values()))
    assert buffers["num_batches_tracked"].item() == 1


@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp"])
def test_batch_norm_module_with_captured_buffers_under_transforms(transform):
    """A module called inside grad/vjp/jvp updates its own buffers (captured
    by the function) as a call outside the transform does. torch.nn's
    module raises there on its counter's add_ (its running statistics
    would update as ours do: see the functional tests above)."""
    x = make_tensor((4, 3, 2), torch.float64)
    ours, theirs = _modules()
    call = {
        "grad": lambda m: grad(lambda x: m(x).sin().sum())(x),
        "vjp": lambda m: vjp(m, x)[1](x.cos()),
        "jvp": lambda m: jvp(m, (x,), (x.cos(),)),
    }[transform]
    call(ours)
    theirs(x)
    _assert_close(tuple(_buffers(ours).values()), tuple(_buffers(theirs).values()))
    assert ours.num_batches_tracked.item() == 1


@pytest.mark.parametrize("mode", ["no_running_stats", "eval", "train"])
def test_batch_norm_module_under_vmap_matches_torch(mode):
    """vmap over the batch: works without running statistics and in eval,
    raises torch's error in training with them (leaving every buffer)."""
    xs = make_tensor((2, 4, 3, 2), torch.float64)
    ours, theirs = _modules(track_running_stats=mode != "no_running_stats")
    if mode == "eval":
        ours.eval(), theirs.eval()
    if mode == "train":
        before = _buffers(ours)
        for module in (ours, theirs):
            with pytest.raises(RuntimeError, match="Batch norm got a batched tensor as input"):
                vmap(module)(xs)
        _assert_close(tuple(_buffers(ours).values()), tuple(before.values()))
        return
    _assert_close(vmap(ours)(xs), vmap(theirs)(xs))
    _assert_close(tuple(_buffers(ours).values()), tuple(_buffers(theirs).values()))


def test_batch_norm_ensemble_in_training_updates_each_models_buffers():
    """stack_module_state + vmap(functional_call) in training: every model's
    running statistics and counter are updated from its own batch."""
    xs = make_tensor((3, 4, 3, 2), torch.float64)
    results = []
    for lib in (layernorm_ext, torch.nn):
        torch.manual_seed(4)
        models = [lib.BatchNorm1d(3).double() for _ in range(3)]
        for m in models:
            m.running_mean.normal_()
        params, buffers = torch.func.stack_module_state(models)
        out = vmap(lambda p, b, x: functional_call(models[0], (p, b), (x,)))(params, buffers, xs)
        results.append((out, buffers))
    _assert_close(results[0][0], results[1][0])
    _assert_close(tuple(results[0][1].values()), tuple(results[1][1].values()))
    assert results[0][1]["num_batches_tracked"].tolist() == [1, 1, 1]

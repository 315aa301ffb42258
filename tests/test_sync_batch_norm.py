"""SyncBatchNorm: on CPU with gloo, groups of 2 and 3 spawned processes on
127.0.0.1 must give what one BatchNorm over the concatenated global batch gives
(torch.nn.functional.batch_norm in float64): outputs, input gradients, summed
weight/bias gradients, running statistics, with unequal local batches and a
rank with no samples; a DDP training loop must match a single-process one; and
without a group it must be torch's SyncBatchNorm / BatchNorm.

Each spawned group runs many checks (process start-up costs seconds); a child
that fails raises, the parent re-raises its traceback and kills the rest. The
ranks meet through a FileStore in a fresh directory: no port to race for and
no store server thread in rank 0 to outlive its peers, and every rank passes a
barrier before any tears its group down.
"""

import copy
import datetime
import inspect
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from layernorm_ext import BatchNorm3d, SyncBatchNorm

TIMEOUT_S = 60
# Against the float64 reference: the input's own rounding (bfloat16, float16)
# or float32 accumulation.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _init_group(store_dir, rank, world_size):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_dir}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )


def _rank_main(rank, world_size, store_dir, check):
    torch.set_num_threads(1)
    _init_group(store_dir, rank, world_size)
    try:
        check(rank, world_size)
        # No rank destroys the group while a peer may still be using it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world_size, check):
    """Runs check(rank, world_size) in world_size gloo processes; raises what a
    child raised (with its traceback), or TimeoutError; never leaves a child."""
    with tempfile.TemporaryDirectory() as store_dir:
        context = mp.start_processes(
            _rank_main,
            args=(world_size, store_dir, check),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 2 * TIMEOUT_S
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks still running after {2 * TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()


# ---------------------------------------------------------------- references


def _global_case(sizes, rest, dtype, *, affine=True, track=True, momentum=0.1, seed=0):
    """The global batch (float64; sizes[r] samples for rank r), its output
    gradient and a module state, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    channels = rest[0]
    shape = (sum(sizes),) + tuple(rest)
    # Offset means: the merge must not lose precision to large means.
    offset = 3.0 * torch.randn(channels, generator=gen, dtype=torch.float64)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x + offset.view((1, -1) + (1,) * (len(rest) - 1))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    state = {
        "weight": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_mean": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
    }
    return dict(
        sizes=sizes,
        x=x,
        dy=dy,
        state=state,
        dtype=dtype,
        affine=affine,
        track=track,
        momentum=momentum,
    )


def _reference(case, steps):
    """One BatchNorm over the global batch, in float64, for `steps` training calls."""
    state = case["state"]
    weight = state["weight"].clone().requires_grad_() if case["affine"] else None
    bias = state["bias"].clone().requires_grad_() if case["affine"] else None
    running = [state["running_mean"].clone(), state["running_var"].clone()]
    if not case["track"]:
        running = [None, None]
    x = case["x"].clone().requires_grad_()
    for step in range(steps):
        momentum = 1.0 / (step + 1) if case["momentum"] is None else case["momentum"]
        y = F.batch_norm(x, *running, weight, bias, True, momentum, 1e-5)
    y.backward(case["dy"])
    grads = (weight.grad, bias.grad) if case["affine"] else (None, None)
    return y.detach(), x.grad, grads, running


def _local_module(case, group=None):
    dtype = case["dtype"]
    channels = case["x"].shape[1]
    module = SyncBatchNorm(
        channels,
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
        process_group=group,
        dtype=dtype,
    )
    module.load_state_dict(
        {k: v for k, v in case["state"].items() if k in module.state_dict()}, strict=False
    )
    return module


def _slice(tensor, sizes, index):
    start = sum(sizes[:index])
    return tensor[start : start + sizes[index]]


class _CollectiveCounter:
    """Counts the torch.distributed collectives called while active."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}
        for name, fn in self.saved.items():

            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.calls.append(_name)
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _check_case(case, index, group=None, steps=1, channels_last=False):
    """Runs the case on this rank (the `index`-th slice of the global batch)
    and compares with the float64 reference; all ranks of the group call it."""
    dtype = case["dtype"]
    tol = TOLERANCE[dtype]
    sizes = case["sizes"]
    y_ref, dx_ref, (dw_ref, db_ref), running_ref = _reference(case, steps)
    module = _local_module(case, group)
    x = _slice(case["x"], sizes, index).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with _CollectiveCounter() as forward_calls:
        for _ in range(steps):
            y = module(x)
    with _CollectiveCounter() as backward_calls:
        y.backward(_slice(case["dy"], sizes, index).to(dtype))
    assert forward_calls.calls == ["all_gather"] * steps, forward_calls.calls
    assert backward_calls.calls == ["all_reduce"], backward_calls.calls
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), _slice(y_ref, sizes, index), atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), _slice(dx_ref, sizes, index), atol=tol, rtol=tol)
    if case["affine"]:
        # Local parameter gradients summed over the ranks, as DDP does.
        grads = torch.stack([module.weight.grad, module.bias.grad]).double()
        dist.all_reduce(grads, group=group)
        torch.testing.assert_close(grads, torch.stack([dw_ref, db_ref]), atol=tol, rtol=tol)
    if case["track"]:
        torch.testing.assert_close(module.running_mean.double(), running_ref[0], atol=tol, rtol=tol)
        torch.testing.assert_close(module.running_var.double(), running_ref[1], atol=tol, rtol=tol)
        assert module.num_batches_tracked.item() == steps
        # eval: no synchronization, this rank's input against the running stats.
        module.eval()
        with _CollectiveCounter() as eval_calls:
            y_eval = module(x.detach())
        assert eval_calls.calls == []
        expected = F.batch_norm(
            _slice(case["x"], sizes, index),
            *running_ref,
            case["state"]["weight"] if case["affine"] else None,
            case["state"]["bias"] if case["affine"] else None,
            False,
            0.0,
            1e-5,
        )
        torch.testing.assert_close(y_eval.double(), expected, atol=tol, rtol=tol)
    else:
        assert module.running_mean is None


def _check_errors(rank):
    """Misuse raises the single-BatchNorm error on every rank, leaves the
    state as it was, and leaves the group usable."""
    module = SyncBatchNorm(3, dtype=torch.float64)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        module(torch.randn(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        module(torch.randn(2, 4, dtype=torch.float64))
    # One value per channel over the whole group (rank 0 has it, the others none).
    lonely = torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(lonely)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    module(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert module.num_batches_tracked.item() == 1


def _check_world3(rank, world_size):
    assert world_size == 3
    f64 = torch.float64
    _check_case(_global_case([3, 0, 5], (4, 3, 2), f64), rank)
    _check_case(_global_case([2, 1, 4], (5,), f64, momentum=None), rank, steps=2)
    _check_case(_global_case([2, 3, 1], (3, 2, 2), torch.float32), rank, channels_last=True)
    _check_case(_global_case([0, 4, 3], (3, 5), f64, affine=False, track=False), rank)
    _check_case(_global_case([3, 2, 2], (4, 3), torch.float16), rank)
    # Every rank empty: empty output, running stats kept, counter counts it.
    empty = _global_case([0, 0, 0], (3, 2), f64)
    module = _local_module(empty)
    x = torch.empty(0, 3, 2, dtype=f64, requires_grad=True)
    module(x).sum().backward()
    assert x.grad.shape == x.shape and module.num_batches_tracked.item() == 1
    assert torch.equal(module.running_mean, empty["state"]["running_mean"])
    _check_errors(rank)
    # A subgroup: ranks 0 and 2 synchronize with each other; rank 1, outside
    # it, is a local BatchNorm.
    pair = dist.new_group([0, 2])
    case = _global_case([4, 3], (3, 2), f64, seed=1)
    if rank != 1:
        _check_case(case, rank // 2, group=pair)
    else:
        module = _local_module(case, group=pair)
        x = case["x"][:4]
        state = case["state"]
        running = [state["running_mean"].clone(), state["running_var"].clone()]
        expected = F.batch_norm(x, *running, state["weight"], state["bias"], True, 0.1, 1e-5)
        with _CollectiveCounter() as calls:
            torch.testing.assert_close(module(x), expected)
        assert calls.calls == []
        torch.testing.assert_close(module.running_var, running[1])


def _small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, stride=2),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).double()


def _check_ddp(rank, world_size):
    """DDP training with SyncBatchNorm over unequal local batches equals
    single-process training over the concatenated batch."""
    sizes = [3, 5]
    torch.manual_seed(0)
    reference = _small_cnn()
    model = torch.nn.parallel.DistributedDataParallel(
        SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    )
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 2
    gen = torch.Generator().manual_seed(1)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, model)]
    for _ in range(3):
        x = torch.randn(sum(sizes), 3, 9, 9, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 3, (sum(sizes),), generator=gen)
        reference_loss = F.cross_entropy(reference(x), target)
        # DDP averages gradients over the ranks: a local sum scaled by
        # world_size / global count averages to the global mean loss.
        local = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        loss = F.cross_entropy(model(x[local]), target[local], reduction="sum")
        (loss * world_size / sum(sizes)).backward()
        reference_loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        dist.all_reduce(loss.detach_())
        torch.testing.assert_close(loss / sum(sizes), reference_loss.detach())
    for (name, ours), theirs in zip(
        model.module.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10, msg=name)


def _check_world2(rank, world_size):
    assert world_size == 2
    f64 = torch.float64
    _check_case(_global_case([1, 6], (3, 4, 2), f64), rank, channels_last=True)
    _check_case(_global_case([5, 2], (3, 2, 2, 2, 2), torch.float32), rank)
    _check_case(_global_case([2, 3], (2, 3, 2, 2, 2), f64), rank)  # 6-D: viewed as 3-D
    _check_case(_global_case([4, 3], (3, 5), torch.bfloat16), rank)
    _check_errors(rank)
    _check_ddp(rank, world_size)


def test_three_ranks_equal_one_batch_norm_over_the_global_batch():
    _spawn(3, _check_world3)


def test_two_ranks_and_ddp_training_equal_one_process():
    _spawn(2, _check_world2)


# ---------------------------------------------------------- single process


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 3), (2, 3, 2, 2, 2, 2)])
def test_without_group_equals_torch_sync_batch_norm(shape, affine, track, momentum):
    assert not dist.is_initialized()
    theirs = torch.nn.SyncBatchNorm(
        shape[1],
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        dtype=torch.float64,
    )
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours = SyncBatchNorm(
        shape[1],
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        dtype=torch.float64,
    )
    ours.load_state_dict(theirs.state_dict())
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = (torch.randn(shape, dtype=torch.float64) + 2).requires_grad_()
        x_theirs = x.detach().clone().requires_grad_()
        y, y_theirs = ours(x), theirs(x_theirs)
        torch.testing.assert_close(y, y_theirs)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_theirs.backward(dy)
        torch.testing.assert_close(x.grad, x_theirs.grad)
        for (name, a), b in zip(
            ours.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, msg=name)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


def test_group_of_one_rank_is_local_batch_norm(tmp_path):
    _init_group(tmp_path, 0, 1)
    try:
        module = SyncBatchNorm(3, dtype=torch.float64)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
        with _CollectiveCounter() as calls:
            y = module(x)
        assert calls.calls == []
        torch.testing.assert_close(
            y, F.batch_norm(x, *running, module.weight, module.bias, True, 0.1, 1e-5)
        )
        torch.testing.assert_close(module.running_var, running[1])
    finally:
        dist.destroy_process_group()


def test_input_errors_leave_state_unchanged():
    module = SyncBatchNorm(3)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        module(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        module(torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        module(torch.randn(2, 4))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_compatible_with_torch_sync_batch_norm():
    theirs = torch.nn.SyncBatchNorm(5)
    with torch.no_grad():
        for tensor in theirs.state_dict().values():
            tensor.copy_(
                torch.randint(1, 9, tensor.shape)
                if tensor.dtype == torch.long
                else torch.rand(tensor.shape)
            )
    ours = SyncBatchNorm(5)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.SyncBatchNorm(5)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert repr(ours) == repr(theirs)


def test_convert_sync_batchnorm():
    group = object()  # stored as given, used only when a group is initialized
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3),
        torch.nn.BatchNorm1d(3, momentum=None),
        torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2, eps=1e-3)),
        BatchNorm3d(2, affine=False),
        torch.nn.SyncBatchNorm(2, track_running_stats=False),
    )
    model[2][1].eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(7)
    old = [model[1], model[2][1], model[3], model[4]]
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model and type(model[0]) is torch.nn.Linear
    new = [model[1], model[2][1], model[3], model[4]]
    for before, after in zip(old, new, strict=True):
        assert type(after) is SyncBatchNorm and after.process_group is group
        for attr in (
            "num_features",
            "eps",
            "momentum",
            "affine",
            "track_running_stats",
            "training",
        ):
            assert getattr(after, attr) == getattr(before, attr), attr
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(after, attr) is getattr(before, attr), attr
    assert not model[2][1].training and model[1].num_batches_tracked.item() == 7
    single = torch.nn.BatchNorm2d(3)
    assert type(SyncBatchNorm.convert_sync_batchnorm(single)) is SyncBatchNorm
    if "bias" in inspect.signature(torch.nn.BatchNorm2d).parameters:
        no_bias = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3, bias=False))
        assert no_bias.bias is None and no_bias.weight is not None


def test_without_group_compiles_without_graph_break():
    module = SyncBatchNorm(3)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(4, 3, 5) + 1
    expected = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(compiled(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert module.num_batches_tracked.item() == 1

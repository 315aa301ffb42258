"""The CPU output cache (csrc/cpu/output_cache.h, layernorm_ext/cpu_cache.py):
large outputs reuse freed blocks, stale bytes never reach a result, the limit
holds, and the tensors it makes behave like any other CPU tensor."""

import os
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from child_python import run_python

ROWS, COLS = 256, 1024  # 1 MiB of float32: above the cache's 256 KiB floor
LIMIT = 1 << 30
DEFAULT_LIMIT = 128 << 20  # what cpu_cache's docstring and the README say
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _fresh_cache():
    layernorm_ext.set_cpu_cache_limit(LIMIT)
    layernorm_ext.empty_cpu_cache()
    yield
    layernorm_ext.set_cpu_cache_limit(LIMIT)
    layernorm_ext.empty_cpu_cache()


def _layer_norm_reference(x, weight, bias):
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double()).to(x.dtype)


def test_freed_output_block_is_reused_and_stale_bytes_never_leak():
    x = torch.randn(ROWS, COLS)
    weight, bias = torch.randn(COLS), torch.randn(COLS)
    first = layernorm_ext.layer_norm(x, (COLS,), weight, bias)
    address = first.data_ptr()
    first.fill_(float("nan"))
    del first
    before = layernorm_ext.cpu_cache_info()
    assert before["cached_bytes"] >= ROWS * COLS * 4

    x2 = torch.randn(ROWS, COLS)
    second = layernorm_ext.layer_norm(x2, (COLS,), weight, bias)
    after = layernorm_ext.cpu_cache_info()
    assert second.data_ptr() == address
    assert after["hits"] == before["hits"] + 1
    torch.testing.assert_close(second, _layer_norm_reference(x2, weight, bias))


def test_every_op_output_comes_from_the_cache():
    x = torch.randn(ROWS, COLS, requires_grad=True)
    weight = torch.randn(COLS, requires_grad=True)
    images = torch.randn(8, 64, 32, 32, requires_grad=True)  # 2 MiB
    calls = {
        "layer_norm": lambda: layernorm_ext.layer_norm(x, (COLS,), weight),
        "rms_norm": lambda: layernorm_ext.rms_norm(x, (COLS,), weight),
        "fused_add_rms_norm": lambda: layernorm_ext.fused_add_rms_norm(x, x.detach(), (COLS,), weight)[0],
        "batch_norm": lambda: layernorm_ext.batch_norm(images, None, None, training=True),
        "batch_norm channels_last": lambda: layernorm_ext.batch_norm(
            images.detach().contiguous(memory_format=torch.channels_last), None, None, training=True
        ),
    }

    def step(call):
        out = call()
        if out.requires_grad:
            torch.autograd.grad(out, [x, weight, images], torch.randn_like(out), allow_unused=True)

    for name, call in calls.items():
        step(call)  # warm: the blocks this op needs are now idle in the cache
        before = layernorm_ext.cpu_cache_info()
        step(call)
        after = layernorm_ext.cpu_cache_info()
        assert after["misses"] == before["misses"], name
        assert after["hits"] > before["hits"], name


def test_small_outputs_bypass_the_cache():
    before = layernorm_ext.cpu_cache_info()
    layernorm_ext.layer_norm(torch.randn(16, 64), (64,))
    assert layernorm_ext.cpu_cache_info() == before


def test_limit_zero_turns_caching_off():
    layernorm_ext.set_cpu_cache_limit(0)
    out = layernorm_ext.rms_norm(torch.randn(ROWS, COLS), (COLS,))
    del out
    assert layernorm_ext.cpu_cache_info()["cached_bytes"] == 0


def test_the_oldest_block_goes_first_when_over_the_limit():
    block = ROWS * COLS * 4
    layernorm_ext.set_cpu_cache_limit(block + block // 2)  # room for one block
    small = layernorm_ext.layer_norm(torch.randn(ROWS, COLS), (COLS,))
    large = layernorm_ext.layer_norm(torch.randn(ROWS, COLS + 512), (COLS + 512,))
    large_address = large.data_ptr()
    del small, large  # small is freed first, so it is evicted when large arrives
    info = layernorm_ext.cpu_cache_info()
    assert info["cached_bytes"] == block * 3 // 2
    again = layernorm_ext.layer_norm(torch.randn(ROWS, COLS + 512), (COLS + 512,))
    assert again.data_ptr() == large_address


def test_lowering_the_limit_and_emptying_release_idle_blocks():
    outs = [layernorm_ext.layer_norm(torch.randn(ROWS, COLS), (COLS,)) for _ in range(3)]
    del outs
    assert layernorm_ext.cpu_cache_info()["cached_bytes"] == 3 * ROWS * COLS * 4
    layernorm_ext.set_cpu_cache_limit(ROWS * COLS * 4)
    assert layernorm_ext.cpu_cache_info()["cached_bytes"] == ROWS * COLS * 4
    assert layernorm_ext.empty_cpu_cache() == ROWS * COLS * 4
    assert layernorm_ext.cpu_cache_info()["cached_bytes"] == 0
    with pytest.raises(RuntimeError, match="expected a limit >= 0 bytes, but got -1"):
        layernorm_ext.set_cpu_cache_limit(-1)


def test_a_block_is_not_reused_for_a_much_smaller_request():
    big = layernorm_ext.layer_norm(torch.randn(4 * ROWS, COLS), (COLS,))
    big_address = big.data_ptr()
    del big
    small = layernorm_ext.layer_norm(torch.randn(ROWS, COLS), (COLS,))
    assert small.data_ptr() != big_address


def test_cached_outputs_behave_like_torch_tensors(tmp_path):
    x = torch.randn(ROWS, COLS)
    out = layernorm_ext.layer_norm(x, (COLS,))
    expected = out.clone()
    # Growing the storage goes through the cache's allocator; data is kept.
    out.resize_(2 * ROWS, COLS)
    assert torch.equal(out[:ROWS], expected)
    out.resize_(ROWS, COLS)
    out.mul_(2).add_(1)
    assert torch.equal(out, expected * 2 + 1)
    assert torch.equal(torch.from_numpy(out.numpy()), out)
    assert torch.equal(pickle.loads(pickle.dumps(out)), out)
    torch.save(out, tmp_path / "out.pt")
    assert torch.equal(torch.load(tmp_path / "out.pt"), out)
    shared = layernorm_ext.layer_norm(x, (COLS,)).share_memory_()
    assert shared.is_shared() and torch.equal(shared, expected)


def test_python_threads_share_the_cache_safely():
    weight = torch.randn(COLS)
    inputs = [torch.randn(ROWS, COLS) for _ in range(4)]
    expected = [_layer_norm_reference(x, weight, torch.zeros(COLS)) for x in inputs]
    failures = []

    def work(i):
        for _ in range(25):
            out = layernorm_ext.layer_norm(inputs[i], (COLS,), weight)
            if not torch.allclose(out, expected[i], atol=1e-5, rtol=1e-5):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def _run_python(code, **env):
    """Runs `code` in a fresh interpreter; an env value of None unsets it."""
    environment = {**os.environ, **env}
    environment = {name: value for name, value in environment.items() if value is not None}
    return run_python(["-c", code], env=environment, check=True, timeout=120)


def test_growing_sizes_reuse_blocks_of_their_size_class():
    weight, bias = torch.randn(COLS), torch.randn(COLS)
    steps = range(ROWS, ROWS + 64, 4)  # 1 MiB to 1.25 MiB: three size classes
    before = layernorm_ext.cpu_cache_info()
    for rows in steps:
        x = torch.randn(rows, COLS)
        out = layernorm_ext.layer_norm(x, (COLS,), weight, bias)
        torch.testing.assert_close(out, _layer_norm_reference(x, weight, bias))
        out.fill_(float("nan"))  # stale bytes must not reach the next result
        del out
    after = layernorm_ext.cpu_cache_info()
    assert after["misses"] - before["misses"] <= 3
    assert after["hits"] - before["hits"] >= len(steps) - 3


def test_idle_bytes_never_exceed_the_limit():
    limit = 8 * MIB
    layernorm_ext.set_cpu_cache_limit(limit)
    for rows in range(ROWS, 8 * ROWS, 96):  # 1 to 7.6 MiB, a new class at every step
        outs = [layernorm_ext.rms_norm(torch.randn(rows, COLS), (COLS,)) for _ in range(2)]
        del outs
        assert layernorm_ext.cpu_cache_info()["cached_bytes"] <= limit


def test_the_default_limit_is_the_documented_one_and_holds_as_sizes_grow():
    # The case: outputs growing by 5% a step, from 1 MiB to 40 MiB;
    # the cache used to keep every one of them idle (about 800 MiB).
    code = (
        "import torch, layernorm_ext\n"
        "most, rows = 0, 256.0\n"
        "while rows < 10240:\n"
        "    out = layernorm_ext.layer_norm(torch.zeros(int(rows), 1024), (1024,)); del out\n"
        "    most = max(most, layernorm_ext.cpu_cache_info()['cached_bytes'])\n"
        "    rows *= 1.05\n"
        "print(layernorm_ext.cpu_cache_info()['limit_bytes'], most)\n"
    )
    limit, most = map(int, _run_python(code, LAYERNORM_EXT_CPU_CACHE_MB=None).stdout.split())
    assert limit == DEFAULT_LIMIT
    assert f"default {DEFAULT_LIMIT // MIB}," in layernorm_ext.cpu_cache.__doc__
    assert 0 < most <= DEFAULT_LIMIT


def test_empty_cpu_cache_returns_the_memory_to_the_os():
    # In a fresh process, after a large free has raised glibc's mmap threshold
    # (blocks below it would come from the heap, and free() would keep them
    # resident); small tensors made between the outputs pin the heap.
    code = (
        "import torch, layernorm_ext\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "torch.empty(8 << 20, dtype=torch.uint8).fill_(1)\n"
        "layernorm_ext.set_cpu_cache_limit(1 << 30)\n"
        "x = torch.randn(1024, 1024)\n"
        "outs, pins = [], []\n"
        "for _ in range(16):\n"
        "    outs.append(layernorm_ext.layer_norm(x, (1024,)))\n"
        "    pins.append(torch.randn(64))\n"
        "del outs\n"
        "cached = layernorm_ext.cpu_cache_info()['cached_bytes']\n"
        "before = rss()\n"
        "released = layernorm_ext.empty_cpu_cache()\n"
        "print(cached, released, before - rss())\n"
    )
    cached, released, dropped = map(int, _run_python(code).stdout.split())
    assert cached == released >= 64 * MIB
    assert dropped >= released - 4 * MIB


def test_environment_sets_the_limit():
    code = (
        "import torch, layernorm_ext; layernorm_ext.layer_norm(torch.randn(256, 1024), (1024,)); "
        "print(layernorm_ext.cpu_cache_info())"
    )
    assert "'limit_bytes': 0," in _run_python(code, LAYERNORM_EXT_CPU_CACHE_MB="0").stdout
    assert "'limit_bytes': 3145728," in _run_python(code, LAYERNORM_EXT_CPU_CACHE_MB="3").stdout
    bad = _run_python(code, LAYERNORM_EXT_CPU_CACHE_MB="lots")
    assert f"'limit_bytes': {DEFAULT_LIMIT}," in bad.stdout
    assert "LAYERNORM_EXT_CPU_CACHE_MB must be a whole number of MiB >= 0, but is 'lots'" in bad.stderr


def test_a_forked_child_can_use_the_cache():
    code = (
        "import os, torch, layernorm_ext\n"
        "x = torch.randn(256, 1024)\n"
        "out = layernorm_ext.layer_norm(x, (1024,)); del out\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        # GNU OpenMP cannot start a parallel region in a forked child (torch's
        # own ops hang there too); DataLoader workers run one thread likewise.
        "    torch.set_num_threads(1)\n"
        "    out = layernorm_ext.layer_norm(x, (1024,))\n"
        "    ok = torch.allclose(out, torch.nn.functional.layer_norm(x, (1024,)), atol=1e-5)\n"
        "    os._exit(0 if ok and layernorm_ext.cpu_cache_info()['hits'] >= 1 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', os.waitstatus_to_exitcode(status))\n"
    )
    assert "child 0" in _run_python(code).stdout

"""What SyncBatchNorm's synchronization costs on CPU with gloo.

For 2 to 4 ranks (processes on 127.0.0.1, one thread each) and a few channel
counts, each rank times, on its own (N, C, H, W) float32 batch:
 - the forward collective alone (all_gather of the [3, C] float64 moments),
 - the backward collective alone (all_reduce of the [2, C] float64 sums),
 - a SyncBatchNorm forward + backward, and
 - a local layernorm_ext BatchNorm2d forward + backward (no communication),
and reports the median per call (the slowest rank's). Bytes are what one rank
puts into each collective and what the forward's gathers back.

    python benchmarks/bench_sync_batch_norm.py [--ranks 2 3 4] [--channels 64 256 1024]
        [--batch 8 --size 16] [--iters 50] [--note "measured on a busy machine"]

Writes benchmarks/results/sync_batch_norm_cpu.md.
"""

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import layernorm_ext  # noqa: E402 (after the sys.path insert)
from _report import cpu_description, git_commit  # noqa: E402

RESULT = os.path.join(ROOT, "benchmarks", "results", "sync_batch_norm_cpu.md")


def _median_call_s(fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_timings(channels, args):
    """This rank's median seconds per call: [forward collective, backward
    collective, SyncBatchNorm fwd+bwd, local BatchNorm fwd+bwd]."""
    moments = torch.randn(3, channels, dtype=torch.float64)
    gathered = [torch.empty_like(moments) for _ in range(dist.get_world_size())]
    sums = torch.randn(2, channels, dtype=torch.float64)
    x = torch.randn(args.batch, channels, args.size, args.size, requires_grad=True)
    dy = torch.randn_like(x)
    sync = layernorm_ext.SyncBatchNorm(channels)
    local = layernorm_ext.BatchNorm2d(channels)

    def forward_backward(module):
        return lambda: module(x).backward(dy)

    return [
        _median_call_s(lambda: dist.all_gather(gathered, moments), args.iters),
        _median_call_s(lambda: dist.all_reduce(sums), args.iters),
        _median_call_s(forward_backward(sync), args.iters),
        _median_call_s(forward_backward(local), args.iters),
    ]


def _rank_main(rank, world_size, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for channels in args.channels:
            timings = torch.tensor(_rank_timings(channels, args), dtype=torch.float64)
            dist.all_reduce(timings, op=dist.ReduceOp.MAX)
            if rank == 0:
                queue.put((world_size, channels, timings.tolist()))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(rows, args):
    us = 1e6
    lines = [
        "# SyncBatchNorm on CPU (gloo): communication cost per call",
        "",
        f"- machine: {cpu_description()}, {platform.system()} {platform.release()}",
        f"- torch {torch.__version__}, layernorm_ext commit {git_commit()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- per rank: float32 input ({args.batch}, C, {args.size}, {args.size}), one thread, "
        f"ranks on 127.0.0.1; median of {args.iters} calls, slowest rank",
        "- bytes per rank: what one rank contributes to the forward all_gather ([3, C] "
        "float64) and to the backward all_reduce ([2, C] float64); the forward gathers "
        "world x [3, C] back",
    ]
    if args.note:
        lines.append(f"- **{args.note}**")
    lines += [
        "",
        "| ranks | C | fwd all_gather bytes/rank | fwd collective (us) | "
        "bwd all_reduce bytes/rank | bwd collective (us) | SyncBatchNorm fwd+bwd (us) | "
        "local BatchNorm fwd+bwd (us) | sync overhead |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world_size, channels, (fwd, bwd, sync, local) in rows:
        lines.append(
            f"| {world_size} | {channels} | {3 * channels * 8} | {fwd * us:.0f} | "
            f"{2 * channels * 8} | {bwd * us:.0f} | {sync * us:.0f} | {local * us:.0f} | "
            f"{sync / local:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--note", default="")
    parser.add_argument("--output", default=RESULT)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    rows = []
    for world_size in args.ranks:
        mp.start_processes(
            _rank_main,
            args=(world_size, _free_port(), args, queue),
            nprocs=world_size,
            start_method="spawn",
        )
        while not queue.empty():
            rows.append(queue.get())
    table = _table(rows, args)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()

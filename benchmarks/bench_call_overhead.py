"""Per-call time of the functional ops on small inputs, ours against torch's.

On small inputs the kernels take a microsecond or two, and a call's time is
its fixed cost: the Python wrapper, the dispatcher and the autograd layer.
This times, for layer_norm, rms_norm and batch_norm (training and eval):
the forward with parameters that require grad (as in a module), the same
under torch.no_grad, and forward + backward with an input that requires grad,
on a tiny and a 64x768 input, interleaving ours and torch's in rounds.

    python benchmarks/bench_call_overhead.py [--calls 20000] [--rounds 5] [--threads 1]

Prints microseconds per call (the median over the rounds) and torch / ours.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import layernorm_ext


def _case(shape, kind):
    """(ours, torch's) callables taking (x, params) for one op kind."""
    if kind == "layer_norm":
        return (
            lambda x, w, b, rm, rv: layernorm_ext.layer_norm(x, shape[-1:], w, b),
            lambda x, w, b, rm, rv: F.layer_norm(x, shape[-1:], w, b),
        )
    if kind == "rms_norm":
        return (
            lambda x, w, b, rm, rv: layernorm_ext.rms_norm(x, shape[-1:], w),
            lambda x, w, b, rm, rv: F.rms_norm(x, shape[-1:], w),
        )
    training = kind == "batch_norm train"
    return (
        lambda x, w, b, rm, rv: layernorm_ext.batch_norm(x, rm, rv, w, b, training),
        lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training),
    )


def _timer(fn, mode, x, params, grad_output, calls):
    def run():
        if mode == "no_grad":
            with torch.no_grad():
                for _ in range(calls):
                    fn(x, *params)
        elif mode == "forward":
            for _ in range(calls):
                fn(x, *params)
        else:
            for _ in range(calls):
                fn(x, *params).backward(grad_output)

    def timed():
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) / calls * 1e6

    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"layernorm_ext from {layernorm_ext.__file__}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.calls} calls x "
          f"{args.rounds} rounds, median us per call")
    print(f"{'op':<17} {'shape':<8} {'mode':<9} {'ours':>7} {'torch':>7} {'torch/ours':>10}")
    for kind in ("layer_norm", "rms_norm", "batch_norm train", "batch_norm eval"):
        for shape in ((4, 8), (64, 768)):
            features = shape[-1] if kind.startswith(("layer", "rms")) else shape[1]
            w = torch.randn(features, requires_grad=True)
            b = torch.randn(features, requires_grad=True)
            for mode in ("forward", "no_grad", "fwd+bwd"):
                x = torch.randn(shape, requires_grad=mode == "fwd+bwd")
                grad_output = torch.randn(shape)
                times = {}
                fns = _case(shape, kind)
                timers = []
                for name, fn in zip(("ours", "torch"), fns):
                    # Separate running stats per side, so each updates its own.
                    params = (w, b, torch.zeros(features), torch.ones(features))
                    timer = _timer(fn, mode, x, params, grad_output, args.calls)
                    _timer(fn, mode, x, params, grad_output, 1000)()  # warm up
                    timers.append((name, timer))
                    times[name] = []
                for _ in range(args.rounds):
                    for name, timer in timers:
                        times[name].append(timer())
                ours = statistics.median(times["ours"])
                theirs = statistics.median(times["torch"])
                shape_text = "x".join(map(str, shape))
                print(f"{kind:<17} {shape_text:<8} {mode:<9} {ours:7.2f} {theirs:7.2f} "
                      f"{theirs / ours:9.2f}x", flush=True)


if __name__ == "__main__":
    main()

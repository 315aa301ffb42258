"""Whole-model CPU benchmark: small Hugging Face transformers and timm models as
built, against a copy of each converted by ``layernorm_ext.replace_norms``.

    python benchmarks/bench_models.py [--threads N] [--reps 21] [--quick]
                                      [--models llama,gpt2,...] [--out PATH [--append]]

    # the published file: glibc, then tcmalloc appended to the same file
    python benchmarks/bench_models.py --threads 2 --out benchmarks/results/models_cpu.md
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/bench_models.py --threads 2 --out benchmarks/results/models_cpu.md --append

Models (random weights from configs and ``pretrained=False``; nothing is
downloaded): a 4-layer Llama (float32, and the same in bfloat16), a 4-layer
GPT-2, a 4-layer Hugging Face ViT, and timm's resnet50, convnext_atto,
efficientnet_b0 and vit_tiny_patch16_224. Their sizes are set so that one
forward+backward takes tens to a few hundred milliseconds on 2 cores.

Per model: the model and a ``copy.deepcopy`` of it with its norms converted;
their outputs compared (eval and train mode, and the parameter gradients of
one training step), then timed:

- forward: eval mode, under ``torch.no_grad``;
- forward+backward: train mode, cross-entropy of the logits against random
  targets, ``backward`` into freshly zeroed gradients (no optimizer step).

Original and converted run alternately (A B, then B A, ...) after two
warm-up calls each, and the median of ``--reps`` calls is kept. Reported:
both times, speedup (original / converted), the noise (interquartile range
over median, the worse of the two), the number of converted layers, and,
for scale, the norm layers alone: each one's input captured from the
original model's forward and replayed through the original and the converted
layer (forward, or forward and the gradients of its input and parameters),
summed over the layers; their share of the original's time bounds what the
conversion can gain.

With as many threads as cores, one other busy process stretches each
parallel region by up to a scheduler time slice, so: each model's timing
waits (up to --max-wait seconds) for other processes to go quiet, records
the cores they kept busy meanwhile ("others' load", from /proc/stat), and
is done again (--retries) when that was high. Compare ratios from rows
whose others' load is near zero.

Without --out, prints the tables only. --append adds this run's section
(with its own header) to an existing file instead of replacing it. There
is no plot: benchmarks/_report.py has no plotting helper to share.
"""

import argparse
import copy
import datetime
import importlib.metadata
import importlib.util
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import layernorm_ext  # noqa: E402
from _report import cpu_description, git_commit  # noqa: E402
from bench_cpu import allocator_version, load_average, preloaded_library  # noqa: E402

DEFAULT_REPS = 21
QUICK_REPS = 2
WARMUP_CALLS = 2

# Outputs of the two models differ by the rounding of the norms (other sums
# in another order), grown through the layers after them; these bound that
# growth, relative to the largest magnitude of the compared tensor.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
GRADIENT_FLOOR = 1e-2  # see compare
QUIET_LOAD = 0.2  # cores busy with other processes below which a model's timing starts
RETRY_LOAD = 0.3  # ... and above which, during the timing, it is timed again (--retries)


@dataclass
class Workload:
    """A model and one batch of inputs for it."""

    model: torch.nn.Module
    inputs: dict  # keyword arguments of model.forward
    targets: torch.Tensor  # one class index per row of the flattened logits
    input_description: str
    dtype: torch.dtype = torch.float32


@dataclass
class ModelSpec:
    library: str  # "transformers" or "timm": what must be importable
    build: Callable[[bool], Workload]  # quick -> workload


@dataclass
class Result:
    name: str
    input_description: str
    dtype: str
    converted_layers: int
    conversion_log: str
    differences: Dict[str, float]  # what was compared -> max |a - b| / max |a|
    times: Dict[str, Dict[str, float]] = field(default_factory=dict)  # pass -> contender -> s
    noise: Dict[str, float] = field(default_factory=dict)  # pass -> relative IQR
    norm_times: Dict[str, Dict[str, float]] = field(default_factory=dict)  # pass -> contender -> s
    others_load: float = 0.0  # cores other processes kept busy while this model was timed
    attempts: int = 1  # timings of this model, the last one kept (see RETRY_LOAD)
    worst_gradient: str = ""  # the parameter whose gradients differed most


PASSES = ("forward", "forward+backward")


# --- the models --------------------------------------------------------------


def _language_model_batch(vocab_size, batch, seq):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(vocab_size, (batch, seq), generator=generator)
    targets = torch.randint(vocab_size, (batch * seq,), generator=generator)
    return tokens, targets


def _image_batch(batch, resolution, classes=1000):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, resolution, resolution, generator=generator)
    targets = torch.randint(classes, (batch,), generator=generator)
    return images, targets


def _llama(quick, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, intermediate, vocab, batch, seq = (
        (64, 2, 4, 172, 1000, 2, 16) if quick else (512, 4, 8, 1376, 8000, 2, 128)
    )
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=vocab,
        max_position_embeddings=seq,
    )
    model = LlamaForCausalLM(config).to(dtype)
    tokens, targets = _language_model_batch(vocab, batch, seq)
    return Workload(model, {"input_ids": tokens, "use_cache": False}, targets,
                    f"{batch}x{seq} tokens; hidden {hidden}, {layers} layers, vocab {vocab}", dtype)


def _gpt2(quick):
    from transformers import GPT2Config, GPT2LMHeadModel

    hidden, layers, heads, vocab, batch, seq = (
        (64, 2, 4, 1000, 2, 16) if quick else (512, 4, 8, 8000, 2, 128)
    )
    # Dropout stays at GPT-2's default 0.1: part of its training step.
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=seq)
    model = GPT2LMHeadModel(config)
    tokens, targets = _language_model_batch(vocab, batch, seq)
    return Workload(model, {"input_ids": tokens, "use_cache": False}, targets,
                    f"{batch}x{seq} tokens; hidden {hidden}, {layers} layers, vocab {vocab}")


def _vit_hf(quick):
    from transformers import ViTConfig, ViTForImageClassification

    hidden, layers, heads, resolution, patch, batch = (
        (64, 2, 4, 32, 8, 2) if quick else (384, 4, 6, 224, 16, 4)
    )
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, image_size=resolution, patch_size=patch, num_labels=1000,
    )
    model = ViTForImageClassification(config)
    images, targets = _image_batch(batch, resolution)
    return Workload(model, {"pixel_values": images}, targets,
                    f"{batch}x3x{resolution}x{resolution}; hidden {hidden}, {layers} layers")


def _timm_model(name, batch, resolution, quick_resolution=64, **kwargs):
    def build(quick):
        from model_zoo import import_timm

        timm = import_timm()
        size = quick_resolution if quick else resolution
        batch_size = 2 if quick else batch
        # A ViT's position embedding is sized for one resolution.
        size_kwargs = {"img_size": size} if name.startswith("vit_") else {}
        model = timm.create_model(name, pretrained=False, **kwargs, **size_kwargs)
        images, targets = _image_batch(batch_size, size)
        return Workload(model, {"x": images}, targets, f"{batch_size}x3x{size}x{size}")

    return build


MODELS = {
    "llama": ModelSpec("transformers", _llama),
    "llama_bf16": ModelSpec("transformers", lambda quick: _llama(quick, torch.bfloat16)),
    "gpt2": ModelSpec("transformers", _gpt2),
    "vit_hf": ModelSpec("transformers", _vit_hf),
    "resnet50": ModelSpec("timm", _timm_model("resnet50", batch=4, resolution=128)),
    "convnext_atto": ModelSpec("timm", _timm_model("convnext_atto", batch=8, resolution=224)),
    "efficientnet_b0": ModelSpec("timm", _timm_model("efficientnet_b0", batch=4, resolution=224)),
    "vit_tiny": ModelSpec("timm", _timm_model("vit_tiny_patch16_224", batch=4, resolution=224,
                                              quick_resolution=32)),
}


def logits_of(model, inputs):
    output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output


def loss_of(model, workload):
    logits = logits_of(model, workload.inputs)
    # In float32 whatever the model's dtype, as mixed-precision training does.
    return F.cross_entropy(logits.flatten(0, -2).float(), workload.targets)


# --- conversion and its check -------------------------------------------------


def is_converted(module):
    return (type(module).__module__.split(".")[0] == "layernorm_ext"
            or module.extra_repr().endswith("kernels=layernorm_ext"))


class _LastRecord(logging.Handler):
    """Keeps replace_norms' report line (it is also printed)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.message = ""

    def emit(self, record):
        self.message = record.getMessage()


def _relative_difference(reference, other, floor=1e-30):
    """max |reference - other| / max |reference|, the denominator at least ``floor``."""
    reference, other = reference.detach().double(), other.detach().double()
    return ((reference - other).abs().max() / reference.abs().max().clamp_min(floor)).item()


def compare(original, converted, workload):
    """max |original - converted| / max |original| of the eval and train
    outputs and of every parameter gradient (the worst one) of a training
    step; asserts that each is within TOLERANCE. Returns them and the worst
    gradient's parameter name."""
    differences = {}
    for mode in ("eval", "train"):
        outputs = []
        for model in (original, converted):
            model.train(mode == "train")
            torch.manual_seed(2)  # the same dropout masks in both
            with torch.no_grad():
                outputs.append(logits_of(model, workload.inputs))
        differences[f"{mode} output"] = _relative_difference(*outputs)
    gradients = []
    for model in (original, converted):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss_of(model, workload).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert gradients[0].keys() == gradients[1].keys(), "different parameters got gradients"
    # Some gradients are zero but for rounding (attention key biases: softmax
    # ignores a shift shared by a row; the bias of a BatchNorm whose output
    # the next BatchNorm re-centres), and relative to themselves any two
    # roundings differ by 100%: each is judged against at least a fraction
    # of the largest gradient of the model. (efficientnet_b0's zero biases
    # differ by 5e-7 of that largest gradient, the original's as far from
    # float64 as that and the converted's 8x closer.)
    largest = max(g.abs().max().item() for g in gradients[0].values())
    worst_gradient, differences["gradients (worst parameter)"] = max(
        ((name, _relative_difference(gradients[0][name], gradients[1][name], GRADIENT_FLOOR * largest))
         for name in gradients[0]), key=lambda item: item[1])
    tolerance = TOLERANCE[workload.dtype]
    for what, difference in differences.items():
        assert difference <= tolerance, (
            f"converted model's {what} differs from the original's by {difference:.2e} "
            f"of its largest magnitude (tolerance {tolerance:.0e})"
            + (f"; worst parameter {worst_gradient}" if what.startswith("gradients") else ""))
    return differences, worst_gradient


# --- timing ------------------------------------------------------------------


def _machine_busy_seconds():
    """CPU seconds all cores spent busy since boot (steal included: time the
    hypervisor gave to others is time this machine's work did not get)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OthersLoad:
    """Cores kept busy by everything but this process, from start() to value().

    With as many threads as cores, a parallel region waits for its slowest
    thread: one other busy process can stretch every call by a scheduler
    time slice, on both sides of the comparison alike, so it is recorded."""

    def start(self):
        self._busy, self._own, self._wall = (
            _machine_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def value(self):
        wall = time.perf_counter() - self._wall
        others = (_machine_busy_seconds() - self._busy) - (time.process_time() - self._own)
        return max(others, 0.0) / max(wall, 1e-9)


def wait_for_quiet(max_wait_s, threshold=QUIET_LOAD):
    """Sleeps until other processes keep less than `threshold` cores busy over
    a second, at most `max_wait_s`; returns that last second's load."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        probe = OthersLoad().start()
        time.sleep(1.0)
        load = probe.value()
        if load < threshold or time.perf_counter() >= deadline:
            return load
        print(f"  waiting: other processes keep {load:.2f} cores busy", flush=True)


def time_interleaved(runs: Dict[str, Callable[[], None]], reps):
    """Median seconds per call of each run, and the worst relative interquartile
    range, calling them alternately in an order reversed every repetition."""
    for run in runs.values():
        for _ in range(WARMUP_CALLS):
            run()
    samples = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    noise = 0.0
    if reps >= 4:
        for name, values in samples.items():
            quartiles = statistics.quantiles(values, n=4)
            noise = max(noise, (quartiles[2] - quartiles[0]) / medians[name])
    return medians, noise


def forward_run(model, workload):
    def run():
        with torch.no_grad():
            logits_of(model, workload.inputs)

    return run


def training_run(model, workload):
    def run():
        model.zero_grad(set_to_none=True)
        loss_of(model, workload).backward()

    return run


def captured_norm_inputs(model, names, workload):
    """The input of each named layer in one eval forward of ``model``."""
    modules = dict(model.named_modules())
    inputs, handles = {}, []
    for name in names:
        def keep(module, args, name=name):
            inputs[name] = args[0].detach().clone()
        handles.append(modules[name].register_forward_pre_hook(keep))
    model.eval()
    try:
        with torch.no_grad():
            logits_of(model, workload.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def norm_replay_runs(layers, inputs, training):
    """A run calling every layer on its captured input: forward only (no_grad),
    or forward and the gradients of the input and the layer's parameters."""
    if not training:
        def run():
            with torch.no_grad():
                for name, layer in layers:
                    layer(inputs[name])
        return run

    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    generator = torch.Generator().manual_seed(3)
    output_gradients = {name: torch.randn(x.shape, generator=generator).to(x.dtype)
                        for name, x in inputs.items()}

    def run():
        for name, layer in layers:
            output = layer(leaves[name])
            torch.autograd.grad(output, [leaves[name], *layer.parameters()], output_gradients[name])

    return run


def norm_layer_times(original, converted, names, workload, reps):
    """Seconds of the original's and the converted's norm layers alone, per pass."""
    inputs = captured_norm_inputs(original, names, workload)
    layers = {label: [(name, dict(model.named_modules())[name]) for name in names]
              for label, model in (("original", original), ("converted", converted))}
    times = {}
    for pass_ in PASSES:
        training = pass_ == "forward+backward"
        for model in (original, converted):
            model.train(training)
        runs = {label: norm_replay_runs(layers[label], inputs, training) for label in layers}
        times[pass_], _ = time_interleaved(runs, reps)
    return times


def measure(name, spec, quick, reps, log_record, max_wait_s, retries):
    torch.manual_seed(0)
    workload = spec.build(quick)
    original = workload.model
    converted = copy.deepcopy(original)
    layernorm_ext.replace_norms(converted)
    names = [module_name for module_name, module in converted.named_modules() if is_converted(module)]
    differences, worst_gradient = compare(original, converted, workload)
    result = Result(name, workload.input_description, str(workload.dtype).replace("torch.", ""),
                    len(names), log_record.message, differences, worst_gradient=worst_gradient)
    for attempt in range(1 + retries):
        wait_for_quiet(max_wait_s)
        others_load = OthersLoad().start()
        for pass_, make_run in (("forward", forward_run), ("forward+backward", training_run)):
            training = pass_ == "forward+backward"
            for model in (original, converted):
                model.train(training)
            runs = {label: make_run(model, workload)
                    for label, model in (("original", original), ("converted", converted))}
            result.times[pass_], result.noise[pass_] = time_interleaved(runs, reps)
        if names:
            result.norm_times = norm_layer_times(original, converted, names, workload, reps)
        result.others_load, result.attempts = others_load.value(), attempt + 1
        if result.others_load < RETRY_LOAD:
            break
        print(f"  other processes kept {result.others_load:.2f} cores busy during the timing"
              + ("; timing again" if attempt < retries else ""), flush=True)
    return result


# --- the report ----------------------------------------------------------------


def speedup(result, pass_):
    return result.times[pass_]["original"] / result.times[pass_]["converted"]


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def allocator_description():
    for name in ("tcmalloc", "jemalloc"):
        path = preloaded_library(name)
        if path is not None:
            return f"{allocator_version(name)} ({path}; LD_PRELOAD={os.environ.get('LD_PRELOAD', '')})"
    return f"{allocator_version('glibc')} (no LD_PRELOAD)"


def _version(package):
    # From the installed metadata: importing timm here, in a run that did not
    # need it, would fail on torchvision (see tests/model_zoo.py).
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def markdown_section(results, header, skipped):
    allocator = header["allocator"].split(" (")[0]
    lines = [f"## {allocator}, {header['threads']} thread(s)", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [f"- skipped: {name}: {reason}" for name, reason in skipped.items()]
    lines += [
        "",
        "| model | input | dtype | norm layers converted | pass | original ms | converted ms "
        "| speedup | noise | norms alone: original ms | norms alone: converted ms "
        "| norms' share of original | others' load (cores) | timings |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for pass_ in PASSES:
            times, norm = result.times[pass_], result.norm_times.get(pass_)
            norm_cells = (f"{norm['original'] * 1e3:.2f} | {norm['converted'] * 1e3:.2f} "
                          f"| {100 * norm['original'] / times['original']:.1f}%"
                          if norm else "- | - | -")
            lines.append(
                f"| {result.name} | {result.input_description} | {result.dtype} "
                f"| {result.converted_layers} | {pass_} | {times['original'] * 1e3:.1f} "
                f"| {times['converted'] * 1e3:.1f} | {speedup(result, pass_):.3f}x "
                f"| {100 * result.noise[pass_]:.0f}% | {norm_cells} | {result.others_load:.2f} "
                f"| {result.attempts} |")
    lines += ["", "| pass | models | geomean speedup | min | max |", "|---|---:|---:|---:|---:|"]
    for pass_ in PASSES:
        speedups = [speedup(r, pass_) for r in results]
        if speedups:
            lines.append(f"| {pass_} | {len(speedups)} | {geomean(speedups):.3f}x "
                         f"| {min(speedups):.3f}x | {max(speedups):.3f}x |")
    what = list(results[0].differences) if results else []
    lines += [
        "",
        "Converted vs original, max |difference| / max |original| of: "
        + ", ".join(what) + f" (each parameter's gradient against at least {GRADIENT_FLOOR:.0e} "
        "of the model's largest one); and replace_norms' log line.",
        "",
        "| model | " + " | ".join(what) + " | worst gradient's parameter | replace_norms |",
        "|---|" + "---:|" * len(what) + "---|---|",
    ]
    for result in results:
        lines.append(f"| {result.name} | "
                     + " | ".join(f"{result.differences[w]:.1e}" for w in what)
                     + f" | {result.worst_gradient} | {result.conversion_log} |")
    return "\n".join(lines) + "\n"


MARKDOWN_TITLE = """# layernorm_ext on whole models (CPU)

Small transformers and timm models with random weights, as built ("original")
and a copy converted by `layernorm_ext.replace_norms` ("converted"), timed
alternately in one process: forward = eval mode under `torch.no_grad`;
forward+backward = train mode, cross-entropy loss, `backward()` (no optimizer
step). Median of the repetitions; speedup = original / converted; noise = the
worse of the two interquartile ranges, relative to the median. "Norms alone"
replays each norm layer on its input captured from the original model (its
forward, or forward and its input and parameter gradients), summed over the
layers: their share of the original's time bounds what the conversion can
save. Others' load: cores kept busy by other processes (and the hypervisor's
steal) while the model was timed, from /proc/stat less this process's CPU
time; each model's timing starts once that is low or a wait runs out, and is
done again once when it was high (timings = how many times). Compare only rows
whose others' load is near zero; a later section with fewer models re-times
those that an earlier one measured under load. Written by
`benchmarks/bench_models.py`.
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, one per core)")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed calls per contender and pass (default {DEFAULT_REPS}, "
                             f"--quick {QUICK_REPS})")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and inputs, few repetitions: a smoke test")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait, before timing each model, for other processes to "
                             f"use less than {QUIET_LOAD} cores (default 60, --quick 0)")
    parser.add_argument("--retries", type=int, default=1,
                        help=f"times a model is timed again when other processes kept more than "
                             f"{RETRY_LOAD} cores busy during its timing (default 1)")
    parser.add_argument("--out", help="markdown file to write the tables to")
    parser.add_argument("--append", action="store_true",
                        help="add this run's section to --out instead of replacing the file")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if args.append and not args.out:
        parser.error("--append needs --out")
    reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS)
    max_wait_s = args.max_wait if args.max_wait is not None else (0.0 if args.quick else 60.0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    log = logging.getLogger("layernorm_ext")
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler(sys.stdout))
    log_record = _LastRecord()
    log.addHandler(log_record)

    load_before = load_average()
    started = time.perf_counter()
    results, skipped = [], {}
    for name in names:
        spec = MODELS[name]
        if importlib.util.find_spec(spec.library) is None:
            skipped[name] = f"{spec.library} is not installed"
            print(f"{name}: skipped, {skipped[name]}", flush=True)
            continue
        model_started = time.perf_counter()
        result = measure(name, spec, args.quick, reps, log_record, max_wait_s, args.retries)
        results.append(result)
        print(f"{name} ({result.input_description}, {result.dtype}): "
              f"{result.converted_layers} layers converted; "
              + ", ".join(f"{what} differs by {value:.1e}" for what, value in result.differences.items()),
              flush=True)
        for pass_ in PASSES:
            times = result.times[pass_]
            print(f"  {pass_:16s} original {times['original'] * 1e3:8.1f} ms  converted "
                  f"{times['converted'] * 1e3:8.1f} ms  speedup {speedup(result, pass_):.3f}x  "
                  f"noise {100 * result.noise[pass_]:.0f}%", flush=True)
        print(f"  ({time.perf_counter() - model_started:.0f} s; other processes kept "
              f"{result.others_load:.2f} cores busy meanwhile)", flush=True)

    header = {
        "machine": cpu_description(),
        "threads": torch.get_num_threads(),
        "allocator": allocator_description(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "timm": _version("timm"),
        "layernorm_ext simd": layernorm_ext.build_info()["simd"],
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load average (1, 5, 15 min) before / after": f"{load_before} / {load_average()}",
        "repetitions": f"{reps} per contender and pass, after {WARMUP_CALLS} warm-up calls",
        "wall time": f"{time.perf_counter() - started:.0f} s",
        "command": " ".join(
            ([f"LD_PRELOAD={os.environ['LD_PRELOAD']}"] if os.environ.get("LD_PRELOAD") else [])
            + ["python benchmarks/bench_models.py", *argv]),
    }
    section = markdown_section(results, header, skipped)
    print("\n" + section)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and out.exists():
            out.write_text(out.read_text().rstrip("\n") + "\n\n" + section)
        else:
            out.write_text(MARKDOWN_TITLE + "\n" + section)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

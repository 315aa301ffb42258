"""What LayerNorm and BatchNorm do to a Linear layer's activations.

A Linear layer is fed non-centred inputs (uniform in [0, 1), like pixel
intensities), so its outputs have a different mean and spread per feature and
per sample. We pass them through ``layernorm_ext.LayerNorm`` and
``layernorm_ext.BatchNorm1d`` (training mode) and look at three statistics:

* LayerNorm standardizes each *sample* (row) over its features: every row ends
  with mean ~0 and biased variance ~1, while the per-feature statistics across
  the batch stay uneven (they are not LayerNorm's business).
* BatchNorm standardizes each *feature* (column) over the batch: every column
  ends with mean ~0 and biased variance ~1, while a single sample's values need
  not be centred.

The figure (``docs/statistics.png``) shows, for the Linear output, after
LayerNorm and after BatchNorm: a histogram of all values, the per-feature mean
and variance across the batch, and the per-sample mean and variance across the
features (sample 0's values marked in the title).

Why a hand-written LayerNorm with ``x.std()`` differs from ``nn.LayerNorm``
--------------------------------------------------------------------------
A popular hand-written LayerNorm computes::

    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.std(-1, keepdim=True) ** 2 + eps)

``Tensor.std`` defaults to the *unbiased* estimator (divides by ``N - 1``),
so ``std**2 = var_b * N / (N - 1)`` with ``var_b`` the biased variance (divide
by ``N``) that ``nn.LayerNorm`` and ``layernorm_ext.LayerNorm`` use. The two
outputs therefore differ by the ratio::

    y_hand / y_ln = sqrt((var_b + eps) / (var_b * N / (N - 1) + eps))
                  ~ sqrt((N - 1) / N)        when var_b >> eps

so the hand-written version is *smaller* by a factor ~sqrt((N-1)/N): 0.894
for the tutorials' N = 5 features, 0.99935 for N = 768. Its rows then have
biased variance (N-1)/N instead of 1. The fix is ``x.var(-1,
unbiased=False)`` with eps inside the square root, which is what the library
computes. ``unbiased_std_difference`` measures the ratio and prints it next to
the prediction.

Run: ``python examples/statistics.py`` (full size, writes docs/statistics.png)
or ``python examples/statistics.py --quick --out /tmp/x`` (small, for tests).
"""

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import layernorm_ext

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def activations(batch, in_features, out_features, seed=0, device="cpu"):
    """The output of a freshly initialised Linear layer on inputs uniform in [0, 1).

    The non-centred inputs give each output feature its own mean (the sum of
    its weights times 0.5) and spread, as in a real network's first layer.
    """
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    # A stream of its own: drawn from the same seeded stream as the weights,
    # the first inputs would repeat the weight rows and correlate with them.
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, in_features, generator=generator)
    with torch.no_grad():
        return linear.to(device)(x.to(device))


def normalize(h):
    """``h`` after our LayerNorm and after our BatchNorm1d (training mode, batch
    statistics), and the largest differences from torch.nn's layers."""
    features = h.shape[1]
    ours_ln = layernorm_ext.LayerNorm(features).to(h.device)
    ours_bn = layernorm_ext.BatchNorm1d(features).to(h.device)
    torch_ln = torch.nn.LayerNorm(features).to(h.device)
    torch_bn = torch.nn.BatchNorm1d(features).to(h.device)
    with torch.no_grad():
        after_ln, after_bn = ours_ln(h), ours_bn(h)
        ln_diff = (after_ln - torch_ln(h)).abs().max().item()
        bn_diff = (after_bn - torch_bn(h)).abs().max().item()
    return (
        after_ln,
        after_bn,
        {"layer_norm_vs_torch": ln_diff, "batch_norm_vs_torch": bn_diff},
    )


def moments(t):
    """Per-sample (over features, dim 1) and per-feature (over the batch, dim 0)
    mean and biased variance of a 2-D tensor."""
    return {
        "sample_mean": t.mean(dim=1),
        "sample_var": t.var(dim=1, unbiased=False),
        "feature_mean": t.mean(dim=0),
        "feature_var": t.var(dim=0, unbiased=False),
    }


def summary(t):
    """The numbers that say which axis a tensor is standardized along."""
    m = moments(t)
    return {
        "max |sample mean|": m["sample_mean"].abs().max().item(),
        "max |sample var - 1|": (m["sample_var"] - 1).abs().max().item(),
        "max |feature mean|": m["feature_mean"].abs().max().item(),
        "max |feature var - 1|": (m["feature_var"] - 1).abs().max().item(),
    }


def hand_written_layer_norm(x, eps=1e-5):
    """The tutorials' hand-written LayerNorm: unbiased ``std``, eps added to std**2."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    return (x - mean) / torch.sqrt(std**2 + eps)


def unbiased_std_difference(features, rows=256, eps=1e-5, seed=0):
    """Compare the hand-written LayerNorm with ours on float64 rows of ``features``
    values: the measured ratio y_hand / y_ours (its mean, min, max over the
    elements), the predicted sqrt((N-1)/N), the largest absolute difference and
    the rows' biased variance after the hand-written version."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64) * 3 + 1
    ours = layernorm_ext.layer_norm(x, (features,), eps=eps)
    hand = hand_written_layer_norm(x, eps)
    # Elements very close to the row mean give 0/0-like ratios; skip them.
    usable = ours.abs() > 1e-3
    ratio = hand[usable] / ours[usable]
    return {
        "features": features,
        "predicted": math.sqrt((features - 1) / features),
        "ratio_mean": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "max_abs_diff": (hand - ours).abs().max().item(),
        "hand_row_var": hand.var(-1, unbiased=False).mean().item(),
    }


def scatter_mean_and_var(ax, mean, var, over, xlabel, title):
    """One panel: a mean and a variance per index, with the targets 0 and 1 drawn."""
    index = torch.arange(len(mean))
    ax.plot(index, mean, ".", color="tab:blue", label=f"mean over {over}")
    ax.plot(index, var, ".", color="tab:red", label=f"var over {over}")
    ax.axhline(0, color="tab:blue", lw=0.6)
    ax.axhline(1, color="tab:red", lw=0.6)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.legend(loc="best", fontsize=8)


def plot(h, after_ln, after_bn, path, sample=0):
    """One figure: rows = histogram, per-feature stats, per-sample stats;
    columns = Linear output, after LayerNorm, after BatchNorm1d."""
    columns = [
        ("Linear output", h),
        ("after our LayerNorm", after_ln),
        ("after our BatchNorm1d", after_bn),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for col, (name, t) in enumerate(columns):
        t = t.detach().float().cpu()
        m = moments(t)
        ax = axes[0, col]
        ax.hist(t.flatten().numpy(), bins=80, color="tab:gray")
        ax.set_title(
            f"{name}\nall values: mean {t.mean():.3f}, var {t.var(unbiased=False):.3f}"
        )
        ax.set_xlabel("value")

        scatter_mean_and_var(
            axes[1, col],
            m["feature_mean"],
            m["feature_var"],
            "batch",
            "feature index",
            "per feature (across the batch)",
        )
        scatter_mean_and_var(
            axes[2, col],
            m["sample_mean"],
            m["sample_var"],
            "features",
            "sample index",
            f"per sample (across features); sample {sample}: "
            f"mean {m['sample_mean'][sample]:.3f}, var {m['sample_var'][sample]:.3f}",
        )
    fig.suptitle(
        "LayerNorm standardizes each sample (bottom row: 0 / 1), "
        "BatchNorm each feature (middle row: 0 / 1)",
        fontsize=13,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run(
    batch=512,
    in_features=64,
    out_features=256,
    out_dir=DOCS,
    seed=0,
    device="cpu",
    verbose=True,
):
    """The whole example: activations, normalization, printed numbers, figure.
    Returns the numbers (summaries per stage, differences from torch, the
    hand-written LayerNorm comparison) and the PNG's path."""
    h = activations(batch, in_features, out_features, seed, device)
    after_ln, after_bn, vs_torch = normalize(h)
    stages = {
        "linear": summary(h),
        "layer_norm": summary(after_ln),
        "batch_norm": summary(after_bn),
    }
    hand = [unbiased_std_difference(n, seed=seed) for n in (5, 16, out_features, 768)]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "statistics.png")
    plot(h, after_ln, after_bn, path)
    if verbose:
        print(
            f"Linear({in_features}, {out_features}) on a batch of {batch} inputs uniform in [0, 1), device {device}"
        )
        for stage, numbers in stages.items():
            print(
                f"  {stage:>10}: "
                + ", ".join(f"{k} {v:.2e}" for k, v in numbers.items())
            )
        print(
            "  ours vs torch.nn: LayerNorm max |diff| {layer_norm_vs_torch:.1e}, "
            "BatchNorm1d max |diff| {batch_norm_vs_torch:.1e}".format(**vs_torch)
        )
        print(
            "hand-written LayerNorm (x.std() unbiased, eps added to std**2) / ours, float64:"
        )
        for r in hand:
            print(
                f"  N={r['features']:>4}: ratio {r['ratio_mean']:.6f} (min {r['ratio_min']:.6f}, "
                f"max {r['ratio_max']:.6f}), predicted sqrt((N-1)/N) = {r['predicted']:.6f}; "
                f"max |diff| {r['max_abs_diff']:.2e}; its row var {r['hand_row_var']:.6f} (= (N-1)/N)"
            )
        print(f"wrote {path}")
    return {"stages": stages, "vs_torch": vs_torch, "hand_written": hand, "png": path}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small batch, for the smoke test"
    )
    parser.add_argument(
        "--out", default=DOCS, help="directory for statistics.png (default docs/)"
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        return run(
            batch=64, in_features=16, out_features=32, out_dir=args.out, device=device
        )
    return run(out_dir=args.out, device=device)


if __name__ == "__main__":
    main(sys.argv[1:])

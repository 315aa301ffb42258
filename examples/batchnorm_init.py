"""BatchNorm makes training insensitive to the weight-initialisation scale.

An MLP (5 hidden layers of 100 ReLU units) classifies scikit-learn's bundled
8x8 handwritten digits (``sklearn.datasets.load_digits``: 1797 images, no
download), trained by plain SGD. Every Linear weight is drawn from
N(0, scale**2) for several scales, and the net is trained twice per scale:

* without normalization: a small scale shrinks the activations layer after
  layer (and the gradients with them), so training stalls near chance (10%);
  a large scale blows them up, so the first SGD steps overshoot. Only a narrow
  band of scales (near He's sqrt(2 / fan_in) ~ 0.14 here) trains well;
* with ``layernorm_ext.BatchNorm1d`` after each hidden Linear (before the
  ReLU): each feature is re-standardized over the batch, so whatever the
  scale, every layer sees inputs of mean 0 and variance 1, and all scales
  train alike.

The figure (``docs/batchnorm_init.png``) shows the test accuracy after every
epoch: one panel without BatchNorm, one with, one line per scale.

Run: ``python examples/batchnorm_init.py`` (full size, writes
docs/batchnorm_init.png) or ``python examples/batchnorm_init.py --quick --out
/tmp/x`` (two scales, two epochs, for tests).
"""

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import layernorm_ext

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")

FULL = {"scales": (1.0, 0.3, 0.1, 0.03, 0.01), "epochs": 30, "hidden": 100, "depth": 5}
QUICK = {"scales": (1.0, 0.01), "epochs": 2, "hidden": 32, "depth": 3}


def digits(device="cpu", test_fraction=0.25, seed=0):
    """The digits as float pixels in [0, 1] (64 per image) and labels, split
    into a shuffled training set and a test set."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test = int(len(x) * test_fraction)
    x, y = x[order].to(device), y[order].to(device)
    return (x[test:], y[test:]), (x[:test], y[:test])


def mlp(scale, batch_norm, hidden, depth, inputs=64, classes=10):
    """``depth`` hidden layers Linear [-> BatchNorm1d] -> ReLU, then a Linear
    head; every Linear weight ~ N(0, scale**2), every bias 0."""
    layers, width = [], inputs
    for _ in range(depth):
        layers.append(torch.nn.Linear(width, hidden))
        if batch_norm:
            layers.append(layernorm_ext.BatchNorm1d(hidden))
        layers.append(torch.nn.ReLU())
        width = hidden
    layers.append(torch.nn.Linear(width, classes))
    net = torch.nn.Sequential(*layers)
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=scale)
            torch.nn.init.zeros_(layer.bias)
    return net


@torch.no_grad()
def accuracy(net, x, y):
    net.eval()  # BatchNorm uses its running statistics
    correct = (net(x).argmax(dim=1) == y).float().mean().item()
    net.train()
    return correct


def train(
    scale,
    batch_norm,
    data,
    epochs,
    hidden,
    depth,
    batch=64,
    lr=0.05,
    seed=0,
    device="cpu",
):
    """SGD on the training digits; the test accuracy before training and after
    every epoch, and the training loss of every step (inf/nan when it diverged)."""
    (train_x, train_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    net = mlp(scale, batch_norm, hidden, depth).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    shuffle = torch.Generator().manual_seed(seed)
    accuracies, losses = [accuracy(net, test_x, test_y)], []
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=shuffle).to(device)
        # Full batches only: a short last batch (of one sample, at worst) would
        # give BatchNorm noisy (or no) variance estimates.
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start : start + batch]
            loss = F.cross_entropy(net(train_x[rows]), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        accuracies.append(accuracy(net, test_x, test_y))
    return accuracies, losses


def plot(results, scales, path, title):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = plt.cm.viridis([i / max(1, len(scales) - 1) for i in range(len(scales))])
    for ax, batch_norm in zip(axes, (False, True)):
        for scale, color in zip(scales, colors):
            acc, losses = (
                results[(scale, batch_norm)]["accuracies"],
                results[(scale, batch_norm)]["losses"],
            )
            diverged = "" if math.isfinite(losses[-1]) else " (loss nan: diverged)"
            ax.plot(
                range(len(acc)),
                acc,
                color=color,
                lw=2,
                label=f"init std {scale:g}: {acc[-1]:.1%}{diverged}",
            )
        ax.axhline(0.1, color="gray", ls=":", lw=1)
        ax.set_title("with our BatchNorm1d" if batch_norm else "without BatchNorm")
        ax.set_xlabel("epoch")
        ax.legend(loc="center right", title="final test accuracy")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run(
    scales, epochs, hidden, depth, out_dir=DOCS, seed=0, device="cpu", verbose=True
):
    """The whole example: one training per (scale, with/without BatchNorm),
    printed accuracies, figure. Returns the results and the PNG's path."""
    data = digits(device, seed=seed)
    results = {}
    for batch_norm in (False, True):
        for scale in scales:
            accuracies, losses = train(
                scale, batch_norm, data, epochs, hidden, depth, seed=seed, device=device
            )
            results[(scale, batch_norm)] = {"accuracies": accuracies, "losses": losses}
            if verbose:
                print(
                    f"{'with' if batch_norm else 'without'} BatchNorm, init std {scale:<5g}: "
                    f"test accuracy {accuracies[0]:.1%} -> "
                    + " ".join(f"{a:.0%}" for a in accuracies[1 :: max(1, epochs // 6)])
                    + f" -> {accuracies[-1]:.1%}, last loss {losses[-1]:.3g}"
                )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "batchnorm_init.png")
    (train_x, _), (test_x, _) = data
    title = (
        f"MLP {depth}x{hidden} ReLU on sklearn digits ({len(train_x)} train / {len(test_x)} test), "
        f"SGD, weights ~ N(0, std^2): BatchNorm makes the init scale irrelevant"
    )
    plot(results, scales, path, title)
    if verbose:
        print(f"wrote {path}")
    return {"results": results, "png": path}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="two scales, two epochs, for the smoke test",
    )
    parser.add_argument(
        "--out", default=DOCS, help="directory for batchnorm_init.png (default docs/)"
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return run(out_dir=args.out, device=device, **(QUICK if args.quick else FULL))


if __name__ == "__main__":
    main(sys.argv[1:])

"""A small GPT-style (pre-norm) transformer trained as a character-level
language model, once with torch.nn.LayerNorm and once with layernorm_ext's.

Where LayerNorm sits in a GPT model: every transformer block normalizes the
input of its multi-head attention and the input of its MLP (pre-norm, the
residual stream itself is never normalized), and one more LayerNorm precedes
the output head:

    x = x + attention(norm1(x))
    x = x + mlp(norm2(x))
    ...
    logits = head(final_norm(x))

Both runs start from the same seed, so they have the same initial weights and
see the same batches; ``layernorm_ext.LayerNorm`` computes the same function
(up to float rounding), so the two loss curves coincide. Float rounding
differences (a few ulps) are then amplified by training, slowly: the curves
agree to about 1e-4 after a few hundred steps, not bit for bit. The time per
step (forward, backward and optimizer step of the whole model, median over
the steps after a warm-up; the two models take turns step by step, so both
see the same machine load) is printed and shown in the legend; LayerNorm is a
small part of the step, so the two times are close.

The training text is examples/data/tiny_text.txt (public domain, see
examples/data/README.md).

Run: ``python examples/gpt_block.py`` (full size, writes docs/gpt_block.png)
or ``python examples/gpt_block.py --quick --out /tmp/x`` (small, for tests).
"""

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import layernorm_ext

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
TEXT = os.path.join(HERE, "data", "tiny_text.txt")

FULL = {"steps": 300, "batch": 32, "context": 64, "width": 96, "heads": 4, "layers": 3}
QUICK = {"steps": 25, "batch": 8, "context": 32, "width": 32, "heads": 2, "layers": 2}


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (
            t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class Block(torch.nn.Module):
    """Pre-norm transformer block. GPT-from-scratch code often writes its own
    LayerNorm with parameters named ``scale`` and ``shift`` and ``eps=1e-5``:
    those are torch.nn.LayerNorm's ``weight`` and ``bias`` (same init, ones
    and zeros) and its default eps, so ``norm(width)`` is that layer."""

    def __init__(self, width, heads, norm):
        super().__init__()
        self.norm1 = norm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = norm(width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width),
            torch.nn.GELU(),
            torch.nn.Linear(4 * width, width),
        )

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab, context, width, heads, layers, norm):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.position_embedding = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.Sequential(
            *(Block(width, heads, norm) for _ in range(layers))
        )
        self.final_norm = norm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.final_norm(self.blocks(x)))


def load_text(path=TEXT):
    """The text as a tensor of character ids, and the id -> character table."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def train(
    norms,
    data,
    vocab,
    steps,
    batch,
    context,
    width,
    heads,
    layers,
    seed=0,
    device="cpu",
    lr=3e-3,
):
    """Train one TinyGPT per entry of ``norms`` (name -> LayerNorm class), each
    from the same seed, for ``steps`` steps on the same batches. The models
    take turns step by step, so that a machine whose load changes over time
    (a shared CPU) slows both alike. Returns, per name, the model, the
    training loss of every step and the seconds of every step."""
    runs = {}
    for name, norm in norms.items():
        torch.manual_seed(seed)
        model = TinyGPT(vocab, context, width, heads, layers, norm).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        runs[name] = {
            "model": model,
            "optimizer": optimizer,
            "losses": [],
            "seconds": [],
        }
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(data) - context - 1, (batch,), generator=batches)
        window = torch.stack([data[s : s + context + 1] for s in starts]).to(device)
        inputs, targets = window[:, :-1], window[:, 1:]
        for run in runs.values():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = F.cross_entropy(
                run["model"](inputs).reshape(-1, vocab), targets.reshape(-1)
            )
            run["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            run["optimizer"].step()
            if device == "cuda":
                torch.cuda.synchronize()
            run["seconds"].append(time.perf_counter() - start)
            run["losses"].append(loss.item())
    return runs


@torch.no_grad()
def sample(model, chars, context, length=200, seed=0, device="cpu"):
    """``length`` characters generated from a newline, sampling the model's distribution."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[chars.index("\n")]], device=device)
    for _ in range(length):
        probs = torch.softmax(model(tokens[:, -context:])[0, -1].float().cpu(), dim=-1)
        tokens = torch.cat(
            [tokens, torch.multinomial(probs, 1, generator=generator).to(device)[None]],
            1,
        )
    return "".join(chars[i] for i in tokens[0, 1:].tolist())


def step_time(seconds, warmup=5):
    """Median seconds per step, the first ``warmup`` steps left out. (Not the
    stdlib's statistics.median: examples/statistics.py shadows that module
    when a script in examples/ runs.)"""
    return (
        torch.tensor(seconds[warmup:] if len(seconds) > warmup else seconds)
        .median()
        .item()
    )


def plot(runs, path, title):
    """Loss curves of both runs on one axis; their difference on a second one."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {
        "torch.nn.LayerNorm": {"lw": 3, "alpha": 0.5},
        "layernorm_ext.LayerNorm": {"lw": 1, "ls": "--"},
    }
    for name, run in runs.items():
        left.plot(
            run["losses"],
            label=f"{name}: {run['ms_per_step']:.1f} ms/step",
            **styles[name],
        )
    left.set_xlabel("step")
    left.set_ylabel("training loss (cross-entropy, nats/char)")
    left.set_title("loss curves (they coincide)")
    left.legend()
    (torch_run, ours_run) = runs.values()
    diff = [abs(a - b) for a, b in zip(torch_run["losses"], ours_run["losses"])]
    right.semilogy([max(d, 1e-9) for d in diff], color="tab:purple")
    right.set_xlabel("step")
    right.set_title("|loss(ours) - loss(torch.nn)|  (values below 1e-9 drawn at 1e-9)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run(out_dir=DOCS, seed=0, device="cpu", verbose=True, **shape):
    """The whole example: two trainings of a model of ``shape`` (the keys of
    FULL), printed numbers, figure. Returns both runs (losses, seconds, ms
    per step), their largest loss difference and the PNG's path."""
    data, chars = load_text()
    norms = {
        "torch.nn.LayerNorm": torch.nn.LayerNorm,
        "layernorm_ext.LayerNorm": layernorm_ext.LayerNorm,
    }
    runs = train(norms, data, len(chars), seed=seed, device=device, **shape)
    for name, r in runs.items():
        r["ms_per_step"] = 1e3 * step_time(r["seconds"])
        if verbose:
            print(
                f"{name:>24}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
                f"{r['ms_per_step']:.1f} ms/step (median)"
            )
    max_diff = max(abs(a - b) for a, b in zip(*(r["losses"] for r in runs.values())))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpt_block.png")
    title = (
        "character-level GPT ({layers} pre-norm blocks, width {width}, {heads} heads, "
        "context {context}, batch {batch}) on ".format(**shape)
        + f"{len(data) / 1024:.0f} KB of text, {device}, {torch.get_num_threads()} threads; "
        f"max |loss difference| {max_diff:.1e}"
    )
    plot(runs, path, title)
    if verbose:
        print(f"max |loss difference| over {shape['steps']} steps: {max_diff:.2e}")
        model = runs["layernorm_ext.LayerNorm"]["model"]
        print(
            f"sample from the model with our LayerNorm:\n{sample(model, chars, shape['context'], device=device)}"
        )
        print(f"wrote {path}")
    return {"runs": runs, "max_diff": max_diff, "png": path}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, few steps, for the smoke test"
    )
    parser.add_argument(
        "--steps", type=int, help="training steps (default 300, 25 with --quick)"
    )
    parser.add_argument(
        "--out", default=DOCS, help="directory for gpt_block.png (default docs/)"
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(QUICK if args.quick else FULL)
    if args.steps:
        shape["steps"] = args.steps
    return run(out_dir=args.out, device=device, **shape)


if __name__ == "__main__":
    main(sys.argv[1:])

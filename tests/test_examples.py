"""Smoke tests of examples/ in their reduced-size modes, asserting what each
example claims to show (and writing the PNGs to a temporary folder, never docs/)."""

import importlib.util
import math
import os

import pytest
import torch

from child_python import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    """Import examples/<name>.py by path under a private module name (without
    putting examples/ on sys.path, where statistics.py would shadow the stdlib's)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_statistics_layer_norm_standardizes_samples_batch_norm_features():
    stats = load_example("statistics")
    h = stats.activations(batch=96, in_features=16, out_features=40, seed=3)
    after_ln, after_bn, vs_torch = stats.normalize(h)
    before, ln, bn = stats.moments(h), stats.moments(after_ln), stats.moments(after_bn)
    # The Linear output is standardized along neither axis ...
    assert before["feature_mean"].abs().max() > 0.1
    assert (before["sample_var"] - 1).abs().max() > 0.1
    # ... LayerNorm standardizes each row (var/(var + eps) ~ 1 - eps/var) ...
    assert ln["sample_mean"].abs().max() < 1e-5
    assert (ln["sample_var"] - 1).abs().max() < 1e-3
    assert ln["feature_mean"].abs().max() > 0.1
    # ... and BatchNorm each column.
    assert bn["feature_mean"].abs().max() < 1e-5
    assert (bn["feature_var"] - 1).abs().max() < 1e-3
    assert (bn["sample_var"] - 1).abs().max() > 0.05
    assert (
        vs_torch["layer_norm_vs_torch"] < 1e-5
        and vs_torch["batch_norm_vs_torch"] < 1e-5
    )


@pytest.mark.parametrize("features", [2, 5, 7, 100])
def test_statistics_hand_written_layer_norm_is_smaller_by_sqrt_n_minus_1_over_n(
    features,
):
    import layernorm_ext

    stats = load_example("statistics")
    eps = 1e-5
    x = torch.randn(64, features, dtype=torch.float64) * 3 + 1
    hand, ours = (
        stats.hand_written_layer_norm(x, eps),
        layernorm_ext.layer_norm(x, (features,), eps=eps),
    )
    # Exactly: y_hand / y_ours = sqrt((v + eps) / (v * N / (N - 1) + eps)), v the biased variance.
    v = x.var(-1, unbiased=False, keepdim=True)
    exact = torch.sqrt((v + eps) / (v * features / (features - 1) + eps))
    torch.testing.assert_close(hand, ours * exact, rtol=1e-10, atol=1e-12)
    assert (hand - ours).abs().max() > 1e-3

    # The example's summary: ratio ~ sqrt((N-1)/N) (eps/v shifts it a little
    # for rows of small variance), rows' variance (N-1)/N.
    r = stats.unbiased_std_difference(features, rows=64, eps=eps, seed=features)
    predicted = math.sqrt((features - 1) / features)
    assert r["predicted"] == pytest.approx(predicted)
    assert r["ratio_mean"] == pytest.approx(predicted, rel=1e-3)
    assert r["ratio_min"] >= predicted * (1 - 1e-9)
    assert r["hand_row_var"] == pytest.approx((features - 1) / features, rel=1e-3)


def test_statistics_script_quick_mode_writes_its_png(tmp_path):
    done = run_python(
        [os.path.join(ROOT, "examples", "statistics.py"), "--quick", "--out", str(tmp_path)],
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "predicted sqrt((N-1)/N)" in done.stdout
    png = tmp_path / "statistics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt_block_loss_curves_agree_and_decrease(tmp_path):
    gpt = load_example("gpt_block")
    out = gpt.run(out_dir=str(tmp_path), verbose=False, **{**gpt.QUICK, "steps": 20})
    torch_losses, ours_losses = (r["losses"] for r in out["runs"].values())
    assert len(torch_losses) == len(ours_losses) == 20
    assert all(math.isfinite(v) for v in torch_losses + ours_losses)
    # Same seed, same function up to float rounding: the curves coincide.
    assert out["max_diff"] < 1e-4
    assert abs(torch_losses[0] - ours_losses[0]) < 1e-5
    # Training works: from ~ln(vocab) down by a clear margin.
    assert torch_losses[0] == pytest.approx(math.log(len(gpt.load_text()[1])), abs=0.3)
    assert sum(ours_losses[-5:]) / 5 < ours_losses[0] - 0.5
    assert all(r["ms_per_step"] > 0 for r in out["runs"].values())
    assert os.path.getsize(out["png"]) > 0


def test_gpt_block_model_uses_the_given_norm():
    gpt = load_example("gpt_block")
    import layernorm_ext

    model = gpt.TinyGPT(
        vocab=11, context=8, width=16, heads=2, layers=2, norm=layernorm_ext.LayerNorm
    )
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    # Two per block (before attention, before the MLP) and one before the head.
    assert len(norms) == 2 * 2 + 1
    assert all(type(m) is layernorm_ext.LayerNorm and m.eps == 1e-5 for m in norms)
    assert model(torch.randint(11, (3, 8))).shape == (3, 8, 11)


def test_batchnorm_init_quick_mode(tmp_path):
    bni = load_example("batchnorm_init")
    out = bni.run(out_dir=str(tmp_path), verbose=False, **bni.QUICK)
    results = out["results"]
    assert set(results) == {
        (s, bn) for s in bni.QUICK["scales"] for bn in (False, True)
    }
    for scale in bni.QUICK["scales"]:
        with_bn = results[(scale, True)]
        assert len(with_bn["accuracies"]) == bni.QUICK["epochs"] + 1
        assert all(math.isfinite(v) for v in with_bn["losses"] + with_bn["accuracies"])
        # Trained well above chance (10 classes) whatever the init scale.
        assert with_bn["accuracies"][-1] > 0.3
    # Without BatchNorm, the tiny init scale stalls near chance.
    assert results[(0.01, False)]["accuracies"][-1] < 0.3
    assert os.path.getsize(out["png"]) > 0
    assert any(
        isinstance(m, torch.nn.BatchNorm1d) for m in bni.mlp(0.1, True, 8, 2).modules()
    )

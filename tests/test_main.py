"""``python -m layernorm_ext``: the report, its JSON form, and its exit status."""

import json
import os
import subprocess
import sys
from pathlib import Path

from child_python import run_python

import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext import __main__ as report

ROOT = Path(__file__).resolve().parent.parent
BUILD_INFO_KEYS = {"cuda", "cuda_available", "openmp", "threads", "torch_version", "source"}
EXPECTED_OPS = {
    "layer_norm",
    "rms_norm",
    "batch_norm (training)",
    "batch_norm (eval)",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
}


def run_module(*args):
    return run_python(["-m", "layernorm_ext", *args], check=False, timeout=300)


def expected_devices():
    cuda = layernorm_ext.build_info()["cuda_available"]
    return {"cpu", "cuda"} if cuda else {"cpu"}


def test_every_op_is_in_the_table():
    assert {op.label for op in report.OPS} == EXPECTED_OPS


def test_text_report_passes():
    result = run_module()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for key in BUILD_INFO_KEYS:
        assert key in out
    for device in expected_devices():
        for op in EXPECTED_OPS:
            assert f"PASS  {device:<5} {op}" in out, (device, op, out)
    assert "FAIL" not in out
    assert "speedup" in out
    assert f"all {len(EXPECTED_OPS) * len(expected_devices())} checks passed" in out


def test_json_report_passes():
    result = run_module("--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)

    assert data["passed"] is True
    assert data["version"] == layernorm_ext.__version__
    assert BUILD_INFO_KEYS <= set(data["build_info"])
    assert data["build_info"]["threads"] >= 1

    checks = {(c["op"], c["device"]): c for c in data["checks"]}
    expected = {(op, device) for op in EXPECTED_OPS for device in expected_devices()}
    assert set(checks) == expected
    failed = {key: c["detail"] for key, c in checks.items() if not c["passed"]}
    assert not failed

    timed = {(row["op"], row["device"]) for row in data["speed"]}
    assert timed == expected
    for row in data["speed"]:
        assert row["ours_ms"] > 0 and row["torch_ms"] > 0
        assert abs(row["speedup"] - row["torch_ms"] / row["ours_ms"]) < 1e-9
        assert row["dtype"] == "float32"


def test_main_command_in_the_repository_root_uses_the_tested_build(tmp_path):
    """The README's main command, typed in the repository root, whose source
    tree comes first on sys.path: it runs the build this process tests (the
    installed one, named in one line, when the source tree has no build of its
    own), never a JIT build of the source tree."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    # A JIT build would land here, not in a cache that may hold one already.
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    prebuilt = layernorm_ext.build_info()["source"] == "prebuilt"
    result = subprocess.run(
        [sys.executable, "-m", "layernorm_ext", "--json", "--no-speed"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["build_info"]["source"] == layernorm_ext.build_info()["source"]
    assert not (prebuilt and any(tmp_path.iterdir())), "the source tree was JIT-built"
    tested = Path(layernorm_ext.__path__[0])
    if tested != ROOT / "layernorm_ext":
        (note,) = [line for line in result.stderr.splitlines() if "shadows" in line]
        assert f"using the installed build in {tested}" in note


def run_in_process(capsys, *args):
    status = report.main(["--json", "--no-speed", *args])
    return status, json.loads(capsys.readouterr().out)


def outcome(data, op, device="cpu"):
    (check,) = [c for c in data["checks"] if c["op"] == op and c["device"] == device]
    return check


def test_wrong_forward_fails(monkeypatch, capsys):
    def off_by_a_little(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return F.layer_norm(input, normalized_shape, weight, bias, eps) * (1 + 1e-6)

    monkeypatch.setattr(layernorm_ext, "layer_norm", off_by_a_little)
    status, data = run_in_process(capsys)
    assert status == 1
    assert data["passed"] is False
    check = outcome(data, "layer_norm")
    assert not check["passed"]
    assert check["detail"].startswith("AssertionError: output #0")
    assert outcome(data, "rms_norm")["passed"]


def test_wrong_backward_fails(monkeypatch, capsys):
    def wrong_input_gradient(input, normalized_shape, weight=None, eps=None):
        output = F.rms_norm(input, normalized_shape, weight, eps)
        return output + 0.5 * (input - input.detach())  # same values, other gradient

    monkeypatch.setattr(layernorm_ext, "rms_norm", wrong_input_gradient)
    status, data = run_in_process(capsys)
    assert status == 1
    check = outcome(data, "rms_norm")
    assert not check["passed"]
    assert "gradient of argument #0" in check["detail"]


def test_running_stats_not_updated_fails(monkeypatch, capsys):
    def stats_left_alone(input, running_mean, running_var, *args, **kwargs):
        return F.batch_norm(input, running_mean.clone(), running_var.clone(), *args, **kwargs)

    monkeypatch.setattr(layernorm_ext, "batch_norm", stats_left_alone, raising=False)
    status, data = run_in_process(capsys)
    assert status == 1
    assert "argument after the call" in outcome(data, "batch_norm (training)")["detail"]
    # In eval mode the running statistics are not updated, so it is right there.
    assert outcome(data, "batch_norm (eval)")["passed"]


def test_missing_or_raising_op_fails(monkeypatch, capsys):
    def raises(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.delattr(layernorm_ext, "layer_norm")
    monkeypatch.setattr(layernorm_ext, "rms_norm", raises)
    status, data = run_in_process(capsys)
    assert status == 1
    assert outcome(data, "layer_norm")["detail"] == (
        "AssertionError: layernorm_ext has no function 'layer_norm'"
    )
    assert outcome(data, "rms_norm")["detail"] == "RuntimeError: kernel exploded"


def test_text_report_shows_failures(monkeypatch, capsys):
    monkeypatch.setattr(layernorm_ext, "rms_norm", lambda *args: torch.zeros(()))
    status = report.main(["--no-speed"])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL  cpu   rms_norm" in out
    assert "checks FAILED" in out

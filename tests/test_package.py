"""Packaging: build info, the prebuilt/JIT choice, and the JIT build from a bare source tree."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layernorm_ext

REPO = Path(__file__).resolve().parent.parent

# Run in a child process: loads the extension the way the environment says,
# checks one op against torch, and prints build_info() as JSON.
CHILD = """
import json, torch, layernorm_ext
x = torch.randn(7, 33)
torch.testing.assert_close(layernorm_ext.layer_norm(x, (33,)), torch.nn.functional.layer_norm(x, (33,)))
print(json.dumps(layernorm_ext.build_info()))
"""


def test_build_info_keys():
    info = layernorm_ext.build_info()
    assert {"cuda", "openmp", "threads", "torch_version", "source"} <= set(info)
    assert info["source"] in ("prebuilt", "jit")
    assert info["torch_version"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert info["openmp"] is True  # built with -fopenmp on every supported platform


def test_load_jit_refuses_a_second_library():
    if layernorm_ext.build_info()["source"] == "jit":
        assert layernorm_ext.load_jit() is layernorm_ext.ensure_loaded()
    else:
        with pytest.raises(RuntimeError, match="prebuilt extension .* is already loaded"):
            layernorm_ext.load_jit()


@pytest.fixture(scope="module")
def bare_checkout(tmp_path_factory):
    """The package's Python files and csrc/ as in a git checkout: no compiled _C."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "layernorm_ext", root / "layernorm_ext",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "csrc"))
    shutil.copytree(REPO / "csrc", root / "csrc")
    return root


@pytest.fixture(scope="module")
def extensions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_extensions")


def run_child(checkout, extensions_dir, **env):
    environment = dict(os.environ, PYTHONPATH=str(checkout), TORCH_EXTENSIONS_DIR=str(extensions_dir), **env)
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=checkout, env=environment,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_jit_build_when_asked(bare_checkout, extensions_dir):
    info = run_child(bare_checkout, extensions_dir, LAYERNORM_EXT_JIT="1")
    assert info["source"] == "jit"
    assert info["openmp"] is True


@pytest.mark.slow
def test_bare_checkout_falls_back_to_jit(bare_checkout, extensions_dir):
    info = run_child(bare_checkout, extensions_dir)
    assert info["source"] == "jit"
    # The sources and flags are unchanged, so the cached build is reused.
    assert any(extensions_dir.rglob("*.so"))


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the test command the README gives users."""
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci_lines if "pytest tests" in line and not line.startswith("#"))
    assert command in (REPO / "README.md").read_text()

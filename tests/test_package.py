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


def test_bare_checkout_uses_the_installed_build(bare_checkout, extensions_dir):
    """A source tree without a build, first on sys.path, loads the build this
    process loaded (the installed one, saying so) instead of JIT-building itself."""
    environment = dict(os.environ, PYTHONPATH=str(bare_checkout),
                       TORCH_EXTENSIONS_DIR=str(extensions_dir))
    environment.pop("LAYERNORM_EXT_JIT", None)
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=bare_checkout, env=environment,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    if layernorm_ext.build_info()["source"] == "prebuilt":
        assert info["source"] == "prebuilt"
        (note,) = [line for line in result.stderr.splitlines() if "shadows" in line]
        assert str(bare_checkout) in note and layernorm_ext.__path__[0] in note


def test_jit_fallback_when_no_build_is_installed(tmp_path):
    """installed_build_shadowed_by finds a layernorm_ext with a _C on the rest of
    the path, and nothing (so: the JIT build) when none has one."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from layernorm_ext._loader import installed_build_shadowed_by

    tree, site = tmp_path / "checkout" / "layernorm_ext", tmp_path / "site" / "layernorm_ext"
    for package in (tree, site):
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
    search_path = [str(tree.parent), str(site.parent)]
    assert installed_build_shadowed_by(tree, search_path) is None
    (site / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    assert installed_build_shadowed_by(tree, search_path) == site
    # A tree with a build of its own (pip install -e, build_ext --inplace) is used as it is.
    (tree / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    assert installed_build_shadowed_by(tree, search_path) is None


def test_stale_jit_lock_is_removed(tmp_path, capsys):
    """torch's builder waits forever on the lock file a killed build left; the
    loader removes it once it holds the builders' flock (so no builder is alive)."""
    from layernorm_ext._loader import _exclusive_build

    (tmp_path / "lock").write_text("")
    with _exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert f"removing {tmp_path / 'lock'}, left by a build that was killed" in capsys.readouterr().err


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the test command the README gives users."""
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci_lines if "pytest tests" in line and not line.startswith("#"))
    assert command in (REPO / "README.md").read_text()

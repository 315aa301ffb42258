"""Child Python processes that import the layernorm_ext this test process imported.

A child started in the repository root (its current folder first on sys.path)
or with the checkout on PYTHONPATH would import the source tree instead: not
what was installed, and, without a build there, a JIT build of every source.
So children start in the folder that holds the imported package, which also
comes first on their PYTHONPATH.
"""

import os
import subprocess
import sys
from pathlib import Path

import layernorm_ext

# __path__, not __file__: a source tree that shadows an installed build points
# its __path__ at the installed package (layernorm_ext/_loader.py).
PACKAGE_PARENT = str(Path(layernorm_ext.__path__[0]).parent)


def child_environment(env=None) -> dict:
    """``env`` (default: this process's environment) with PACKAGE_PARENT first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env


def run_python(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python *args`` in PACKAGE_PARENT; ``kwargs`` go to subprocess.run (text output captured)."""
    kwargs.setdefault("cwd", PACKAGE_PARENT)
    return subprocess.run(
        [sys.executable, *args], env=child_environment(env), capture_output=True, text=True, **kwargs
    )

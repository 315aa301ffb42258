"""Runs the CUDA kernels' tests on the executor built with AddressSanitizer,
which reports any read or write past a tensor's bytes (global memory) or past
a launch's dynamic shared memory, then requires every kernel to have run.

Usage: python tests/cuda_emulator/run_sanitized.py [extra pytest arguments]
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cuda_emulator import build  # noqa: E402


def main() -> int:
    if not build.asan_available():
        print("run_sanitized: the C++ compiler has no AddressSanitizer runtime (libasan)", file=sys.stderr)
        return 2
    tests = HERE.parent / "test_cuda_emulated.py"
    pytest = [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider", *sys.argv[1:]]
    # From tests/, so that the repository root (a source tree without _C) does not
    # shadow the installed package.
    status = subprocess.run(pytest, env=build.asan_environment(), cwd=HERE.parent).returncode
    if status != 0:
        return status
    return subprocess.run([sys.executable, str(HERE / "require_all_launched.py"), "--sanitize"]).returncode


if __name__ == "__main__":
    sys.exit(main())

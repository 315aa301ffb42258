"""Fails unless the last test session launched every instantiated CUDA kernel
on the CPU executor (the launches.json that pytest_plugin.py writes).

Usage: python tests/cuda_emulator/require_all_launched.py [--sanitize]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda_emulator import build  # noqa: E402
from cuda_emulator.pytest_plugin import short_name  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", action="store_true", help="the AddressSanitizer build's session")
    args = parser.parse_args()
    report = build.build_directory(args.sanitize) / "launches.json"
    if not report.is_file():
        print(f"no launch report at {report}: no test session loaded the CPU executor", file=sys.stderr)
        return 1
    launches = json.loads(report.read_text())
    launched, missed = launches["launched"], launches["never_launched"]
    print(f"CUDA executor: {len(launched)} of {len(launched) + len(missed)} instantiated kernels launched")
    for name in missed:
        print(f"  never launched: {short_name(name)}", file=sys.stderr)
    return 1 if missed or not launched else 0


if __name__ == "__main__":
    sys.exit(main())

"""pytest side of the CPU executor: the session fixture that builds it, and the
report of which of its instantiated kernels the session launched.

The report goes to the terminal summary and to ``launches.json`` in the
executor's build folder; ``.ci/run`` requires every kernel to have run.
"""

import json
import os

import pytest

from . import build


def executor_or_skip():
    """The executor's Python module (its ops are torch.ops.layernorm_ext_cuda_emulated).

    Where it cannot be built (no CUDA toolkit headers), the test is skipped with
    the reason; in CI (CI set) that is an error instead.
    """
    try:
        return build.load()
    except Exception as error:  # noqa: BLE001 - any build failure
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the CPU executor of the CUDA kernels could not be built here: {error}")


@pytest.fixture(scope="session")
def cuda_executor():
    return executor_or_skip()


def pytest_runtest_setup(item):
    """Every test marked cuda_emulated needs the executor, fixture or not."""
    if item.get_closest_marker("cuda_emulated") is not None:
        executor_or_skip()


def launch_report():
    """(launched kernels' names, never launched kernels' names), or None before the executor loads."""
    module = build.loaded_module()
    if module is None:
        return None
    kernels = build.kernel_symbols(module.library_path())
    launched = {kernels[offset] for offset, _ in module.launched_kernels() if offset in kernels}
    return sorted(launched), sorted(set(kernels.values()) - launched)


def short_name(kernel):
    """`name<template arguments>` of a kernel's demangled signature."""
    name = kernel.split("::")[-1] if ">(" not in kernel else kernel[: kernel.index(">(") + 1]
    return name.replace("void layernorm_ext::cuda::(anonymous namespace)::", "")


def pytest_terminal_summary(terminalreporter):
    report = launch_report()
    if report is None:
        return
    launched, missed = report
    total = len(launched) + len(missed)
    terminalreporter.write_sep("-", "CUDA kernels through the CPU executor")
    terminalreporter.write_line(f"launched {len(launched)} of the {total} instantiated kernels")
    for name in missed:
        terminalreporter.write_line(f"  never launched: {short_name(name)}")
    module = build.loaded_module()
    out = os.path.join(os.path.dirname(module.library_path()), "launches.json")
    with open(out, "w") as f:
        json.dump({"launched": launched, "never_launched": missed}, f, indent=1)

"""Suite-wide test policy: the ``root`` marker.

Tests marked ``@pytest.mark.root`` need root, network namespaces and nftables.
Without root, or without ``nft``/``ip``, they are skipped with the reason shown
(``-ra`` is in the pytest options). Under CI (the ``CI`` environment variable is
set) and as root, a missing tool is a failure, never a silent skip: CI runs as
root precisely so these tests run.
"""

from __future__ import annotations

import os
import shutil

import pytest

ROOT_TOOLS = ("ip", "nft")

# Root's tools live in sbin, which a non-login shell's PATH may lack.
for _sbin in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + _sbin


def _is_root() -> bool:
    return os.geteuid() == 0


def _missing_tools() -> list[str]:
    return [tool for tool in ROOT_TOOLS if shutil.which(tool) is None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None:
        return
    if not _is_root():
        pytest.skip("needs root (network namespaces, nftables)")
    missing = _missing_tools()
    if missing:
        message = f"root test needs {', '.join(missing)} on PATH (run `make setup`)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

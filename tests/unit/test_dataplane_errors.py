"""Kernel failures become KernelError with their errno; no root needed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from egressd.dataplane import NetnsGone, netns_exists
from egressd.dataplane._kernel_errors import kernel_errors
from egressd.dataplane.netns import run_in_netns
from egressd.errors import InvalidInput, KernelError


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (NetlinkError(errno.EEXIST), errno.EEXIST),
        (NetlinkError(errno.EPERM, "Operation not permitted"), errno.EPERM),
        (NetlinkDumpInterrupted(), errno.EINTR),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), errno.ENOENT),
    ],
)
def test_kernel_errors_keep_errno(raised: Exception, expected: int) -> None:
    with pytest.raises(KernelError) as excinfo, kernel_errors("doing it"):
        raise raised
    assert excinfo.value.errno == expected
    assert str(excinfo.value).startswith("doing it: ")


def test_kernel_errors_let_our_errors_through() -> None:
    with pytest.raises(InvalidInput), kernel_errors("doing it"):
        raise InvalidInput("bad")


def test_missing_netns_is_netns_gone() -> None:
    path = "/run/netns/egt-does-not-exist-0"
    assert not netns_exists(path)
    with pytest.raises(NetnsGone) as excinfo:
        run_in_netns(path, lambda: None)
    assert excinfo.value.errno == errno.ENOENT


def test_a_plain_file_is_not_a_netns(tmp_path: Path) -> None:
    plain = tmp_path / "net"
    plain.write_text("")
    assert not netns_exists(str(plain))

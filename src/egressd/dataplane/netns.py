"""Running code inside a container's network namespace, without forking.

Concurrency model: ``setns(CLONE_NEWNET)`` changes the namespace of the
calling *thread* only, so :func:`run_in_netns` runs its function in a fresh
short-lived thread that enters the namespace and is then thrown away; the
caller's thread never changes namespace. What that thread creates keeps
its namespace afterwards: a netlink socket opened there talks to the
container's kernel state from any thread, and a child process started
there (``nft``) lives in the container's namespace.

pyroute2 0.9's own ``IPRoute(netns=...)`` forks a helper process to open
the socket (unsafe next to the agent's other threads) and creates the
namespace when it is missing (``flags=O_CREAT`` by default); both are
avoided here by handing it a socket we opened with ``use_socket``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyroute2 import IPRoute

from egressd.dataplane._kernel_errors import kernel_errors
from egressd.dataplane.names import validate_netns_path
from egressd.errors import KernelError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace (Linux 4.11+)
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12  # Linux 4.20+: dump requests are filtered by their header

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsGone(KernelError):
    """The namespace path does not name a live network namespace (anymore)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"network namespace {path} does not exist", errno=errno.ENOENT)
        self.path = path


def _open_netns(path: str) -> int:
    """An fd on the namespace, or :class:`NetnsGone`.

    A ``/run/netns`` file left behind unmounted, or a ``/proc/PID`` whose
    process exited, is not a namespace: NS_GET_NSTYPE tells them apart.
    """
    validate_netns_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        raise NetnsGone(path) from None
    except OSError as exc:
        raise KernelError(f"open {path}: {exc.strerror}", errno=exc.errno) from None
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        os.close(fd)
        raise NetnsGone(path) from None
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise NetnsGone(path)
    return fd


def netns_exists(path: str) -> bool:
    try:
        os.close(_open_netns(path))
    except NetnsGone:
        return False
    return True


@contextlib.contextmanager
def netns_fd(path: str) -> Iterator[int]:
    """An open fd on the namespace, e.g. for IFLA_NET_NS_FD."""
    fd = _open_netns(path)
    try:
        yield fd
    finally:
        os.close(fd)


def run_in_netns(path: str, func: Callable[[], T]) -> T:
    """Run ``func`` in a new thread that has entered the namespace at ``path``."""
    fd = _open_netns(path)
    result: list[Any] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise KernelError(f"setns {path}: {os.strerror(code)}", errno=code)
            result.append(func())
        except BaseException as exc:
            failure.append(exc)

    try:
        thread = threading.Thread(target=target, name="egressd-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    value: T = result[0]
    return value


@contextlib.contextmanager
def iproute(netns_path: str | None = None) -> Iterator[Any]:
    """A pyroute2 ``IPRoute`` in the host namespace or in ``netns_path``.

    Strict checking is on, so dumps can be filtered by the kernel (see
    :func:`egressd.dataplane.links.ipv4_addresses`).
    """
    with kernel_errors(f"open netlink in {netns_path or 'host netns'}"):
        if netns_path is None:
            ipr = IPRoute(strict_check=True)
        else:
            sock = run_in_netns(
                netns_path,
                lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE),
            )
            try:
                # pyroute2 sets its socket options only on sockets it opens.
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                ipr = IPRoute(use_socket=sock, strict_check=True)
            except BaseException:
                sock.close()
                raise
    try:
        yield ipr
    finally:
        ipr.close()

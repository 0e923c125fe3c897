"""Is this path a live network namespace, and is it not the host's own?

Every backend ends here: whatever the runtime, the handle given to the
dataplane is a file on nsfs (its ``st_dev`` is that of ``/proc/self/ns/net``,
checked before the file is opened) that opens to a *network* namespace
(``NS_GET_NSTYPE`` on the open fd; an unmounted ``/run/netns`` leftover, a regular file or
``/proc/PID/ns/mnt`` are refused), and it is not the namespace egressd
itself or PID 1 lives in. Enforcing on the host namespace would move the
host's default route and wall its traffic: it is refused with a clear
error, never attempted. (``docker run --network host`` containers land here.)
"""

from __future__ import annotations

import errno
import fcntl
import os

from egressd.errors import RuntimeLookupError

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace (Linux 4.11+)
HOST_NETNS_PATHS = ("/proc/self/ns/net", "/proc/1/ns/net")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def host_netns_identities() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of our own network namespace and of PID 1's."""
    return {ident for path in HOST_NETNS_PATHS if (ident := _identity(path)) is not None}


def check_netns_handle(path: str, *, what: str) -> str:
    """``path`` when it is a network namespace other than the host's; else RuntimeLookupError.

    ``what`` names the container in messages (``process 123``, ``docker container 'web'``).
    """
    try:
        # stat before open: a device or FIFO someone named is never opened.
        if os.stat(path).st_dev != os.stat(HOST_NETNS_PATHS[0]).st_dev:
            raise RuntimeLookupError(f"{what}: {path} is not a namespace file")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        raise RuntimeLookupError(f"{what}: network namespace {path} not found") from None
    except PermissionError:
        raise RuntimeLookupError(f"{what}: no permission to open {path}") from None
    except OSError as exc:
        raise RuntimeLookupError(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise RuntimeLookupError(f"{what}: {path} is not a namespace file") from None
            raise RuntimeLookupError(f"{what}: {path}: {exc.strerror}") from None
        if nstype != CLONE_NEWNET:
            raise RuntimeLookupError(f"{what}: {path} is not a network namespace")
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if (st.st_dev, st.st_ino) in host_netns_identities():
        raise RuntimeLookupError(
            f"{what}: {path} is the host's network namespace; "
            "refusing to enforce egress on the host itself"
        )
    return path

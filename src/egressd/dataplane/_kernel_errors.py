"""One translation of kernel failures into :class:`egressd.errors.KernelError`.

pyroute2 raises ``NetlinkError`` (errno in ``.code``); file and socket
calls raise ``OSError`` (errno in ``.errno``). Both keep their errno so the
caller can tell EEXIST from EPERM.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from egressd.errors import EgressdError, KernelError


def errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkDumpInterrupted):
        return errno.EINTR  # the table changed during a dump: try again
    if isinstance(exc, NetlinkError):
        code = exc.code
        return int(code) if code is not None else None
    if isinstance(exc, OSError):
        return exc.errno
    return None


@contextlib.contextmanager
def kernel_errors(what: str) -> Iterator[None]:
    """Raise KernelError("<what>: <reason>") for netlink and OS failures."""
    try:
        yield
    except EgressdError:
        raise
    except (NetlinkError, OSError) as exc:
        if isinstance(exc, NetlinkError) and len(exc.args) > 1:
            reason = str(exc.args[1])
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc)
        raise KernelError(f"{what}: {reason}", errno=errno_of(exc)) from exc

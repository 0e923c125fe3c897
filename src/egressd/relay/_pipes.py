"""Pipes for ``splice(2)``, reused across connections.

Splicing socket -> socket goes through a pipe: socket -> pipe moves page
references, pipe -> socket hands them on, and the payload never enters user
space. Making a pipe costs ``pipe2`` plus ``F_SETPIPE_SZ`` (and two
``close`` later), which for a short connection is as much as moving its
bytes. So a direction of a connection borrows a pipe only while bytes are in
flight and gives it back as soon as the pipe is empty and the source has
nothing more; an idle connection holds no pipe at all, and the pool keeps a
bounded number of empty pipes for the next burst.

Only an empty pipe may go back to the pool (its bytes would otherwise leak
into another connection): :meth:`PipePool.release` is told whether it is
empty and closes it if not.

Concurrency model: used from the event loop thread only; no locking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

# What one splice pair moves at most. Larger means fewer system calls per megabyte, but
# a whole pipe's worth then lands on the receiving socket at once, and when the peer is
# local (a proxy on the same host, or the container) the kernel does more of the
# receive work in the peer's own context rather than during our splice. Measured with
# dante on this host (13 interleaved single-stream uploads per size, bench harness):
# 1 MiB pipes cost the relay ~0.25 s/GB and dante ~1.05, 256 KiB ~0.43 and ~0.89, the
# machine's total the same (2.0-2.1 s/GB); dante, single-threaded, is the bottleneck,
# and carried a median 0.83 (0.79-0.89) of its direct-client throughput instead of
# 0.82 (0.70-0.87): a small gain. Also a quarter of the memory pinned per bulk flow.
# Best effort: capped by fs.pipe-max-size and, for unprivileged users,
# pipe-user-pages-soft.
PIPE_SIZE = 256 << 10
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
DEFAULT_MAX_IDLE = 64


class Pipe:
    """One non-blocking pipe: ``write_fd`` -> ``read_fd``."""

    __slots__ = ("read_fd", "write_fd")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, PIPE_SIZE)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class PipePool:
    """Empty pipes, at most ``max_idle`` of them kept."""

    def __init__(self, *, max_idle: int = DEFAULT_MAX_IDLE) -> None:
        self._idle: list[Pipe] = []
        self._max_idle = max_idle
        self.created = 0  # for tests and curiosity

    def __len__(self) -> int:
        return len(self._idle)

    def acquire(self) -> Pipe:
        if self._idle:
            return self._idle.pop()
        self.created += 1
        return Pipe()

    def release(self, pipe: Pipe, *, empty: bool) -> None:
        if empty and len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for pipe in idle:
            pipe.close()

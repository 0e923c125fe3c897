"""Which nftables ruleset a namespace has: (namespace cookie, ruleset generation).

The kernel counts every committed nftables transaction of a network
namespace (its *generation*, what ``nft list ruleset`` prints as
``# generation``; asked for with ``NFT_MSG_GETGEN``), and gives every
namespace a 64-bit cookie that is never reused while the machine runs
(``SO_NETNS_COOKIE``, Linux 5.14+). So while the pair is unchanged, no
nftables rule of that namespace has changed -- whoever would have changed
it. The agent lists every container's wall, and the host table, on each
resync; a listing is an ``nft`` process (~4 ms) and, for the host table at
a thousand containers, megabytes of JSON. :class:`StampedCache` keeps what
was read under the stamp it was read at, and a resync that finds the same
stamp (the usual case) reuses it.

The stamp is taken *before* the listing: a change in between makes the
cached entry look older than it is (it is read again next time), never
newer.

Read-only; a :func:`ruleset_stamp` call opens, asks and closes one
``NETLINK_NETFILTER`` socket in the calling thread's namespace (~30 us).
The byte layouts are the kernel's (``linux/netfilter/nfnetlink.h``,
``linux/netfilter/nf_tables.h``); parsing is pure and unit-tested.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from egressd.dataplane.rtnl_read import NLM_F_REQUEST, NLMSG_ERROR, attributes, messages
from egressd.errors import KernelError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NFNETLINK_V0 = 0
SO_NETNS_COOKIE = 71  # Linux 5.14+

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, unused here)
_GEN_ID = struct.Struct("!I")  # NFTA_GEN_ID is in network byte order
_COOKIE = struct.Struct("=Q")
_GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
_NEWGEN = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN


@dataclass(frozen=True)
class RulesetStamp:
    netns_cookie: int
    generation: int


def getgen_request(seq: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _GETGEN, NLM_F_REQUEST, seq, 0) + body


def parse_getgen_reply(data: bytes, seq: int) -> int | None:
    """The generation in a reply datagram to request ``seq``; None if it has none."""
    for kind, mseq, payload in messages(data):
        if mseq != seq:
            continue
        if kind == NLMSG_ERROR:
            code = -int(struct.unpack_from("=i", payload)[0])
            raise KernelError(f"nftables generation: {os.strerror(code)}", errno=code)
        if kind == _NEWGEN:
            raw = attributes(payload, _NFGENMSG.size).get(NFTA_GEN_ID)
            if raw is not None and len(raw) == _GEN_ID.size:
                return int(_GEN_ID.unpack(raw)[0])
    return None


def ruleset_stamp() -> RulesetStamp | None:
    """The stamp of the calling thread's namespace; None where the kernel cannot tell.

    None (a kernel older than 5.14, nftables not loaded) means "unknown":
    callers then read the ruleset every time, as without this module.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        sock.settimeout(5.0)
        cookie = _COOKIE.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        sock.send(getgen_request(1))
        generation = parse_getgen_reply(sock.recv(4096), 1)
    except (OSError, KernelError, struct.error):
        return None
    finally:
        sock.close()
    if generation is None:
        return None
    return RulesetStamp(int(cookie), generation)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


MAX_AGE_S = 300.0


class StampedCache(Generic[K, V]):
    """Values read from a namespace's ruleset, kept with the stamp they were read at.

    Thread-safe (the agent may inspect from several threads); bounded: the
    least recently used entries go first beyond ``max_entries``. Entries
    older than ``max_age`` seconds are read again whatever the stamp says:
    a table can leave without a new generation (an ``owner`` table when its
    socket closes; ``parse_wall`` never takes such a table for a wall), and
    this bounds what any such path not thought of could hide to minutes.
    Each entry's age limit is drawn between half and all of ``max_age``, so
    that entries read in one resync are not all read again in one later.
    """

    def __init__(
        self,
        *,
        max_entries: int = 8192,
        max_age: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[K, tuple[RulesetStamp, float, V]] = OrderedDict()
        self._max = max_entries
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # for tests and curiosity

    def _fresh(self, entry: tuple[RulesetStamp, float, V] | None, stamp: RulesetStamp) -> bool:
        """Same stamp, and not past its expiry (``entry[1]``)."""
        return entry is not None and entry[0] == stamp and self._clock() < entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_read(self, key: K, stamp: RulesetStamp | None, read: Callable[[], V]) -> V:
        """The value stored for ``key`` at ``stamp``, else ``read()`` (stored under it)."""
        if stamp is None:
            self.misses += 1
            return read()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._fresh(entry, stamp):  # (narrows the type)
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[2]
        self.misses += 1
        # From before the read, like the stamp.
        expires = self._clock() + self._max_age * (0.5 + random.random() / 2)  # noqa: S311
        value = read()
        with self._lock:
            self._entries[key] = (stamp, expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return value

    def peek(self, key: K, stamp: RulesetStamp | None) -> V | None:
        """The value stored for ``key`` if it was read at ``stamp``; never reads."""
        if stamp is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
        return entry[2] if entry is not None and self._fresh(entry, stamp) else None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

"""nftables ruleset stamps: the GETGEN bytes, and the cache that trusts an unchanged stamp."""

from __future__ import annotations

import socket
import struct

import pytest

from egressd.dataplane.nft_gen import (
    RulesetStamp,
    StampedCache,
    getgen_request,
    parse_getgen_reply,
)
from egressd.dataplane.rtnl_read import NLMSG_ERROR
from egressd.errors import KernelError

NEWGEN = (10 << 8) | 15


def message(kind: int, seq: int, body: bytes) -> bytes:
    data = struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body
    return data.ljust((len(data) + 3) & ~3, b"\0")


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw.ljust((len(raw) + 3) & ~3, b"\0")


def newgen(seq: int, generation: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    body += attr(1, struct.pack("!I", generation))  # NFTA_GEN_ID, network byte order
    body += attr(2, struct.pack("!I", 4242))  # NFTA_GEN_PROC_PID
    body += attr(3, b"nft\0")  # NFTA_GEN_PROC_NAME
    return message(NEWGEN, seq, body)


def test_the_request_is_an_nftables_getgen() -> None:
    raw = getgen_request(7)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", raw)
    assert (length, kind, flags, seq, pid) == (len(raw), (10 << 8) | 16, 1, 7, 0)
    assert raw[16:] == struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)


def test_the_generation_is_read_in_network_byte_order() -> None:
    assert parse_getgen_reply(newgen(3, 0x01020304), 3) == 0x01020304


def test_an_answer_to_another_request_is_not_taken() -> None:
    assert parse_getgen_reply(newgen(2, 99), 3) is None
    assert parse_getgen_reply(newgen(2, 99) + newgen(3, 100), 3) == 100


def test_a_kernel_error_is_raised() -> None:
    error = message(NLMSG_ERROR, 5, struct.pack("=i", -1) + b"\0" * 16)  # -EPERM
    with pytest.raises(KernelError) as info:
        parse_getgen_reply(error, 5)
    assert info.value.errno == 1


class Reads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"listing #{self.count}"


def test_an_unchanged_stamp_reuses_what_was_read() -> None:
    cache: StampedCache[str, str] = StampedCache()
    read = Reads()
    stamp = RulesetStamp(netns_cookie=9, generation=41)
    assert cache.get_or_read("t", stamp, read) == "listing #1"
    assert cache.get_or_read("t", RulesetStamp(9, 41), read) == "listing #1"
    assert read.count == 1


def test_any_change_of_the_ruleset_or_namespace_reads_again() -> None:
    cache: StampedCache[str, str] = StampedCache()
    read = Reads()
    cache.get_or_read("t", RulesetStamp(9, 41), read)
    assert cache.get_or_read("t", RulesetStamp(9, 42), read) == "listing #2"
    assert cache.get_or_read("t", RulesetStamp(10, 42), read) == "listing #3"
    assert cache.get_or_read("t", RulesetStamp(10, 42), read) == "listing #3"


def test_without_a_stamp_every_look_reads() -> None:
    cache: StampedCache[str, str] = StampedCache()
    read = Reads()
    cache.get_or_read("t", None, read)
    cache.get_or_read("t", None, read)
    assert read.count == 2 and len(cache) == 0


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache: StampedCache[int, str] = StampedCache(max_entries=2)
    read = Reads()
    stamp = RulesetStamp(1, 1)
    cache.get_or_read(1, stamp, read)
    cache.get_or_read(2, stamp, read)
    cache.get_or_read(1, stamp, read)  # 1 is now the most recent
    cache.get_or_read(3, stamp, read)  # evicts 2
    assert len(cache) == 2
    assert cache.get_or_read(1, stamp, read) == "listing #1"
    assert cache.get_or_read(2, stamp, read) == "listing #4"


def test_peek_never_reads() -> None:
    cache: StampedCache[str, str] = StampedCache()
    read = Reads()
    assert cache.peek("t", RulesetStamp(1, 1)) is None
    cache.get_or_read("t", RulesetStamp(1, 1), read)
    assert cache.peek("t", RulesetStamp(1, 1)) == "listing #1"
    assert cache.peek("t", RulesetStamp(1, 2)) is None
    assert cache.peek("t", None) is None
    assert read.count == 1


def test_an_old_entry_is_read_again_whatever_the_stamp_says() -> None:
    now = [1000.0]
    cache: StampedCache[str, str] = StampedCache(max_age=300.0, clock=lambda: now[0])
    read = Reads()
    stamp = RulesetStamp(1, 1)
    cache.get_or_read("t", stamp, read)
    now[0] += 149.0  # the age limit is drawn between 150 and 300 s
    assert cache.get_or_read("t", stamp, read) == "listing #1"
    now[0] += 152.0
    assert cache.peek("t", stamp) is None
    assert cache.get_or_read("t", stamp, read) == "listing #2"

"""DNS message builders and a loopback DNS-over-TCP server for the relay's DNS
tests, and tests of them.

The builders write messages by hand (no compression in questions; answers
point back at the question name with ``0xC00C``), so the code under test is
checked against bytes it did not produce.

    DnsTcpServer   answers A/AAAA/TXT/... from a dict; NXDOMAIN / NODATA with an SOA;
                   records every question and every connection's peer address
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

from tests.unit.test_relay_peers import LoopbackServer, async_test, connection

TYPE_A = 1
TYPE_SOA = 6
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
POINTER_TO_QUESTION = b"\xc0\x0c"


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\x00"


def opt_rr(udp_size: int) -> bytes:
    return b"\x00" + struct.pack("!HHIH", TYPE_OPT, udp_size, 0, 0)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = CLASS_IN) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def soa_rdata(minimum: int) -> bytes:
    names = encode_name("ns.example.") + encode_name("hostmaster.example.")
    return names + struct.pack("!IIIII", 1, 3600, 600, 86400, minimum)


def txt_rdata(text: bytes) -> bytes:
    return bytes([len(text)]) + text


def build_query(
    name: str,
    qtype: int = TYPE_A,
    *,
    qid: int = 0x1234,
    edns: int | None = None,
    flags: int = 0x0100,  # RD
) -> bytes:
    additional = opt_rr(edns) if edns is not None else b""
    header = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if additional else 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN) + additional


def question_end(message: bytes) -> int:
    position = 12
    while message[position]:
        position += 1 + message[position]
    return position + 1 + 4


def build_response(
    query: bytes,
    *,
    answers: tuple[bytes, ...] = (),
    authority: tuple[bytes, ...] = (),
    additional: tuple[bytes, ...] = (),
    rcode: int = 0,
    extra_flags: int = 0,
) -> bytes:
    qid, flags = struct.unpack_from("!HH", query)
    flags = 0x8000 | (flags & 0x7900) | 0x0080 | extra_flags | rcode
    header = struct.pack("!HHHHHH", qid, flags, 1, len(answers), len(authority), len(additional))
    question = query[12 : question_end(query)]
    return header + question + b"".join(answers) + b"".join(authority) + b"".join(additional)


@dataclass(frozen=True)
class Decoded:
    id: int
    flags: int
    qdcount: int
    ancount: int
    question: tuple[str, int, int]
    answers: list[tuple[int, int, bytes]]  # (type, ttl, rdata)

    @property
    def rcode(self) -> int:
        return self.flags & 0x000F

    @property
    def tc(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def qr(self) -> bool:
        return bool(self.flags & 0x8000)


def _skip_name(message: bytes, position: int) -> int:
    while True:
        length = message[position]
        if length & 0xC0 == 0xC0:
            return position + 2
        if length == 0:
            return position + 1
        position += 1 + length


def question_of(message: bytes) -> tuple[str, int, int]:
    labels = []
    position = 12
    while message[position]:
        length = message[position]
        labels.append(message[position + 1 : position + 1 + length].decode("ascii"))
        position += 1 + length
    qtype, qclass = struct.unpack_from("!HH", message, position + 1)
    return ".".join(labels) + ".", qtype, qclass


def decode(message: bytes) -> Decoded:
    qid, flags, qdcount, ancount, _ns, _ar = struct.unpack_from("!HHHHHH", message)
    question = question_of(message) if qdcount else ("", 0, 0)
    position = question_end(message) if qdcount else 12
    answers = []
    for _ in range(ancount):
        position = _skip_name(message, position)
        rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", message, position)
        position += 10
        answers.append((rtype, ttl, message[position : position + rdlength]))
        position += rdlength
    return Decoded(qid, flags, qdcount, ancount, question, answers)


def framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


class DnsTcpServer(LoopbackServer):
    """DNS over TCP on 127.0.0.1: ``records[(name, qtype)] = [(ttl, rdata), ...]``."""

    def __init__(
        self,
        records: dict[tuple[str, int], list[tuple[int, bytes]]] | None = None,
        *,
        soa_minimum: int = 60,
        rcode: int | None = None,
        reply_delay: float = 0.0,
        close_after_answer: bool = False,
    ) -> None:
        super().__init__()
        self.records = dict(records or {})
        self.soa_minimum = soa_minimum
        self.rcode = rcode
        self.reply_delay = reply_delay
        self.close_after_answer = close_after_answer
        self.queries: list[tuple[str, int]] = []
        self.peers: list[tuple[str, int]] = []

    def answer(self, query: bytes) -> bytes:
        name, qtype, _qclass = question_of(query)
        if self.rcode is not None:
            return build_response(query, rcode=self.rcode)
        found = self.records.get((name.lower(), qtype))
        if found is not None:
            answers = tuple(rr(POINTER_TO_QUESTION, qtype, ttl, rdata) for ttl, rdata in found)
            return build_response(query, answers=answers)
        soa = rr(encode_name("example."), TYPE_SOA, 3600, soa_rdata(self.soa_minimum))
        exists = any(key[0] == name.lower() for key in self.records)
        return build_response(query, authority=(soa,), rcode=0 if exists else 3)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[:2])
        while prefix := await reader.read(2):
            if len(prefix) == 1:
                prefix += await reader.readexactly(1)
            query = await reader.readexactly(int.from_bytes(prefix, "big"))
            self.queries.append(question_of(query)[:2])
            if self.reply_delay:
                await asyncio.sleep(self.reply_delay)
            writer.write(framed(self.answer(query)))
            await writer.drain()
            if self.close_after_answer:
                return


def a_record(address: str) -> bytes:
    return socket.inet_aton(address)


# -- the peers' own tests ---------------------------------------------------------------


@async_test
async def test_dns_server_answers_nxdomain_and_nodata() -> None:
    records = {("www.example.", TYPE_A): [(300, a_record("192.0.2.7"))]}
    async with DnsTcpServer(records) as server, connection(server.address) as (reader, writer):
        for name, qtype in (("WWW.example.", TYPE_A), ("nope.example.", TYPE_A)):
            writer.write(framed(build_query(name, qtype)))
        writer.write(framed(build_query("www.example.", TYPE_AAAA)))
        replies = []
        for _ in range(3):
            length = int.from_bytes(await reader.readexactly(2), "big")
            replies.append(decode(await reader.readexactly(length)))
    assert replies[0].answers == [(TYPE_A, 300, a_record("192.0.2.7"))]
    assert replies[0].question == ("WWW.example.", TYPE_A, CLASS_IN)
    assert (replies[1].rcode, replies[1].ancount) == (3, 0)
    assert (replies[2].rcode, replies[2].ancount) == (0, 0)
    assert server.queries == [
        ("WWW.example.", TYPE_A),
        ("nope.example.", TYPE_A),
        ("www.example.", TYPE_AAAA),
    ]

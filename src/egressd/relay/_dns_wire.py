"""DNS wire format, sans-IO: just enough to forward, cache and truncate.

Byte layouts (RFC 1035 §4.1; all integers big endian):

    header    ID(2) FLAGS(2) QDCOUNT(2) ANCOUNT(2) NSCOUNT(2) ARCOUNT(2)     = 12 bytes
              FLAGS: QR(1) OPCODE(4) AA TC RD RA Z(3) RCODE(4), QR the top bit
    question  QNAME QTYPE(2) QCLASS(2)
    RR        NAME TYPE(2) CLASS(2) TTL(4) RDLENGTH(2) RDATA
    name      labels LEN(1, 0..63) BYTES..., ended by LEN 0; or a pointer
              0b11 + 14-bit offset into the message (compression, §4.1.4)
    OPT RR    (EDNS0, RFC 6891) NAME=root TYPE=41 CLASS=requestor's UDP payload size
    SOA RDATA MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM (4 bytes each)

Every read is bounds-checked and raises :class:`DnsFormatError`. A pointer
must point before the start of the name segment that contains it, so a
chain of pointers strictly moves backwards and can never loop; names are
capped at 255 bytes. Names are kept in uncompressed wire form; they compare
case-insensitively in ASCII only (``bytes.lower``), as DNS does.

No concurrency here: plain functions of bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
HEADER_LEN = HEADER.size
_RR_FIXED = struct.Struct("!HHIH")  # TYPE CLASS TTL RDLENGTH after the owner name
MAX_NAME_LEN = 255
MAX_LABEL_LEN = 63
MAX_MESSAGE_LEN = 65535
CLASSIC_UDP_PAYLOAD = 512  # RFC 1035 §4.2.1, without EDNS0
MAX_UDP_PAYLOAD = 4096  # what we honour of a client's EDNS0 advertisement

FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
EDNS_FLAG_DO = 0x8000  # in the OPT RR's TTL field: ext-RCODE(8) VERSION(8) DO Z(15)
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

OPCODE_QUERY = 0
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

TYPE_SOA = 6
TYPE_OPT = 41

_TTL_SIGN_BIT = 0x8000_0000  # RFC 2181 §8: a TTL with the top bit set means zero
_SOA_FIXED_LEN = 20


class DnsFormatError(ValueError):
    """The bytes are not a DNS message we can work with."""


class BadQuery(DnsFormatError):
    """A query that will not be forwarded.

    ``reply`` is what to answer (FORMERR, NOTIMP) when the header was
    readable and the message was a query; ``None`` means drop it silently
    (too short to answer, or a response: answering those invites loops).
    """

    def __init__(self, message: str, *, reply: bytes | None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Header:
    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK


@dataclass(frozen=True)
class Question:
    name: bytes  # uncompressed wire form, original case
    qtype: int
    qclass: int

    @property
    def key(self) -> tuple[bytes, int, int]:
        """What the cache and reply matching compare: the name case-folded."""
        return self.name.lower(), self.qtype, self.qclass

    @property
    def text(self) -> str:
        """``example.com.`` for logs; odd bytes escaped as ``\\DDD``."""
        return name_text(self.name)


CacheKey = tuple[bytes, int, int, int, bool]


@dataclass(frozen=True)
class Query:
    message: bytes  # the query as received
    header: Header
    question: Question
    question_bytes: bytes  # the question section exactly as the client sent it
    udp_payload_size: int  # the largest UDP answer this client accepts
    dnssec_ok: bool = False  # EDNS0 DO bit: the client wants RRSIGs

    @property
    def id(self) -> int:
        return self.header.id

    @property
    def cache_key(self) -> CacheKey:
        """The question, plus the bits that change what a server answers
        (RD, CD, DO): a non-recursive or DNSSEC query must not get another's answer."""
        name, qtype, qclass = self.question.key
        return name, qtype, qclass, self.header.flags & (FLAG_RD | FLAG_CD), self.dnssec_ok


@dataclass(frozen=True)
class ResponseInfo:
    header: Header
    question: Question | None
    min_ttl: int | None  # over answer and authority RRs; None when there are none
    soa_minimum: int | None  # min(SOA TTL, SOA MINIMUM) of an authority SOA, for RFC 2308
    ttl_offsets: tuple[int, ...]  # where each RR's TTL sits (OPT excluded)


def parse_header(data: bytes) -> Header:
    if len(data) < HEADER_LEN:
        raise DnsFormatError(f"message shorter than a header ({len(data)} bytes)")
    return Header(*HEADER.unpack_from(data))


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """The name at ``offset``, uncompressed, and the offset just after it."""
    name = bytearray()
    position = offset
    segment_start = offset  # a pointer must point before this
    end: int | None = None
    while True:
        if position >= len(data):
            raise DnsFormatError("name runs past the end of the message")
        length = data[position]
        kind = length & 0xC0
        if kind == 0xC0:
            if position + 1 >= len(data):
                raise DnsFormatError("compression pointer cut short")
            target = ((length & 0x3F) << 8) | data[position + 1]
            if target < HEADER_LEN or target >= segment_start:
                raise DnsFormatError(f"compression pointer to {target} does not point back")
            if end is None:
                end = position + 2
            position = segment_start = target
            continue
        if kind:
            raise DnsFormatError(f"unsupported label type 0x{kind:02x}")
        if length == 0:
            name.append(0)
            return bytes(name), end if end is not None else position + 1
        label_end = position + 1 + length
        if label_end > len(data):
            raise DnsFormatError("label runs past the end of the message")
        if len(name) + 1 + length + 1 > MAX_NAME_LEN:
            raise DnsFormatError(f"name longer than {MAX_NAME_LEN} bytes")
        name += data[position:label_end]
        position = label_end


def name_text(name: bytes) -> str:
    labels: list[str] = []
    position = 0
    while position < len(name) and name[position]:
        length = name[position]
        raw = name[position + 1 : position + 1 + length]
        labels.append(
            "".join(chr(b) if 0x21 <= b <= 0x7E and b not in b".\\" else f"\\{b:03d}" for b in raw)
        )
        position += 1 + length
    return ".".join(labels) + "."


def _read_question(data: bytes, offset: int) -> tuple[Question, int]:
    name, position = read_name(data, offset)
    if position + 4 > len(data):
        raise DnsFormatError("question cut short")
    qtype, qclass = struct.unpack_from("!HH", data, position)
    return Question(name, qtype, qclass), position + 4


@dataclass(frozen=True)
class _Record:
    rtype: int
    rclass: int
    raw_ttl: int
    ttl_offset: int
    rdata_end: int
    rdlength: int
    root_owner: bool

    @property
    def ttl(self) -> int:
        return 0 if self.raw_ttl & _TTL_SIGN_BIT else self.raw_ttl


def _read_record(data: bytes, offset: int) -> _Record:
    name, position = read_name(data, offset)
    if position + _RR_FIXED.size > len(data):
        raise DnsFormatError("resource record cut short")
    rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, position)
    rdata_end = position + _RR_FIXED.size + rdlength
    if rdata_end > len(data):
        raise DnsFormatError("resource record data runs past the end of the message")
    return _Record(rtype, rclass, ttl, position + 4, rdata_end, rdlength, name == b"\x00")


def _header_only_reply(header: Header, rcode: int) -> bytes:
    flags = FLAG_QR | (header.flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | rcode
    return HEADER.pack(header.id, flags, 0, 0, 0, 0)


def parse_query(data: bytes) -> Query:
    """A query we can forward, or :class:`BadQuery` saying how to answer instead."""
    try:
        header = parse_header(data)
    except DnsFormatError as exc:
        raise BadQuery(str(exc), reply=None) from None
    if header.is_response:
        raise BadQuery("message is a response, not a query", reply=None)
    if header.opcode != OPCODE_QUERY:
        raise BadQuery(
            f"opcode {header.opcode} not implemented",
            reply=_header_only_reply(header, RCODE_NOTIMP),
        )
    formerr = _header_only_reply(header, RCODE_FORMERR)
    if header.qdcount != 1:
        raise BadQuery(f"{header.qdcount} questions (need exactly 1)", reply=formerr)
    try:
        question, position = _read_question(data, HEADER_LEN)
        question_bytes = data[HEADER_LEN:position]
        for _ in range(header.ancount + header.nscount):
            position = _read_record(data, position).rdata_end
        udp_payload_size = CLASSIC_UDP_PAYLOAD
        dnssec_ok = False
        seen_opt = False
        for _ in range(header.arcount):
            record = _read_record(data, position)
            position = record.rdata_end
            if record.rtype != TYPE_OPT:
                continue
            if seen_opt or not record.root_owner:
                raise DnsFormatError("more than one OPT record, or one not owned by the root")
            seen_opt = True
            udp_payload_size = max(CLASSIC_UDP_PAYLOAD, min(record.rclass, MAX_UDP_PAYLOAD))
            dnssec_ok = bool(record.raw_ttl & EDNS_FLAG_DO)
    except DnsFormatError as exc:
        raise BadQuery(str(exc), reply=formerr) from None
    return Query(data, header, question, question_bytes, udp_payload_size, dnssec_ok)


def parse_response(data: bytes) -> ResponseInfo:
    """Header, question, TTL facts and TTL positions of a response (from an upstream)."""
    header = parse_header(data)
    if not header.is_response:
        raise DnsFormatError("message is a query, not a response")
    position = HEADER_LEN
    question: Question | None = None
    for index in range(header.qdcount):
        parsed, position = _read_question(data, position)
        if index == 0:
            question = parsed
    min_ttl: int | None = None
    soa_minimum: int | None = None
    offsets: list[int] = []
    answer_and_authority = header.ancount + header.nscount
    for index in range(answer_and_authority + header.arcount):
        record = _read_record(data, position)
        position = record.rdata_end
        if record.rtype == TYPE_OPT:
            continue  # its "TTL" holds EDNS flags
        offsets.append(record.ttl_offset)
        if index >= answer_and_authority:
            continue
        min_ttl = record.ttl if min_ttl is None else min(min_ttl, record.ttl)
        if index >= header.ancount and record.rtype == TYPE_SOA:
            if record.rdlength < 2 + _SOA_FIXED_LEN:
                raise DnsFormatError("SOA record too short")
            (minimum,) = struct.unpack_from("!I", data, record.rdata_end - 4)
            this = min(record.ttl, minimum)
            soa_minimum = this if soa_minimum is None else min(soa_minimum, this)
    return ResponseInfo(header, question, min_ttl, soa_minimum, tuple(offsets))


def answers(info: ResponseInfo, query: Query) -> bool:
    """Is this response an answer to ``query`` (ID aside)? Same question, case folded."""
    return info.question is not None and info.question.key == query.question.key


def cache_lifetime(info: ResponseInfo, *, max_ttl: int, max_negative_ttl: int) -> int:
    """Seconds the response may be cached; 0 means do not cache it.

    Positive answers: the minimum TTL of the answer and authority RRs.
    Negative answers (NXDOMAIN, or NOERROR without answers): the SOA's
    minimum per RFC 2308 §5, capped; without an SOA they are not cached.
    Never SERVFAIL and the like, never a truncated response.
    """
    header = info.header
    if header.truncated or header.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        return 0
    if header.rcode == RCODE_NOERROR and header.ancount > 0:
        return min(info.min_ttl or 0, max_ttl)
    if info.soa_minimum is None:
        return 0
    return min(info.soa_minimum, info.min_ttl or 0, max_negative_ttl)


def error_reply(query: Query, rcode: int) -> bytes:
    """An answer with ``rcode`` (e.g. SERVFAIL), echoing the ID and question."""
    header = query.header
    flags = FLAG_QR | (header.flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | rcode
    return HEADER.pack(header.id, flags, 1, 0, 0, 0) + query.question_bytes


def servfail(query: Query) -> bytes:
    return error_reply(query, RCODE_SERVFAIL)


def with_id(message: bytes, message_id: int) -> bytes:
    return message_id.to_bytes(2, "big") + message[2:]


def personalize(response: bytes, query: Query, *, ttl_offsets: tuple[int, ...], age: int) -> bytes:
    """A cached response made the answer to ``query``: its ID, its question's
    spelling (same name, so the same length and compression offsets), and
    every TTL lowered by ``age`` seconds."""
    out = bytearray(response)
    out[0:2] = query.id.to_bytes(2, "big")
    start = HEADER_LEN
    out[start : start + len(query.question_bytes)] = query.question_bytes
    if age > 0:
        for offset in ttl_offsets:
            (ttl,) = struct.unpack_from("!I", out, offset)
            struct.pack_into("!I", out, offset, max(0, ttl - age))
    return bytes(out)


def truncate(response: bytes, query: Query) -> bytes:
    """The response cut to header + question with TC=1: "ask me again over TCP"."""
    header = parse_header(response)
    flags = header.flags | FLAG_TC
    return HEADER.pack(header.id, flags, 1, 0, 0, 0) + query.question_bytes


def fit_udp(response: bytes, query: Query) -> bytes:
    """The response as it may go back over UDP to this client."""
    if len(response) <= query.udp_payload_size:
        return response
    return truncate(response, query)

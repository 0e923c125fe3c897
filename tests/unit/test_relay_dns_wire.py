"""The DNS wire format and the answer cache, without sockets."""

from __future__ import annotations

import struct

import pytest

from egressd.relay._dns_cache import DnsCache
from egressd.relay._dns_wire import (
    CLASSIC_UDP_PAYLOAD,
    MAX_UDP_PAYLOAD,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_SERVFAIL,
    BadQuery,
    DnsFormatError,
    Query,
    answers,
    cache_lifetime,
    fit_udp,
    name_text,
    parse_query,
    parse_response,
    personalize,
    read_name,
    servfail,
    truncate,
    with_id,
)
from tests.unit.test_relay_dns_peers import (
    CLASS_IN,
    POINTER_TO_QUESTION,
    TYPE_A,
    TYPE_SOA,
    TYPE_TXT,
    a_record,
    build_query,
    build_response,
    decode,
    encode_name,
    opt_rr,
    rr,
    soa_rdata,
    txt_rdata,
)

HEADER = struct.Struct("!HHHHHH")


def header(
    qid: int = 7, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return HEADER.pack(qid, flags, qd, an, ns, ar)


# -- names -----------------------------------------------------------------------------


def test_read_name_plain_and_end_offset() -> None:
    message = header() + encode_name("www.Example.org.") + b"\x00\x01\x00\x01"
    name, end = read_name(message, 12)
    assert name == encode_name("www.Example.org.")
    assert end == 12 + len(name)
    assert name_text(name) == "www.Example.org."


def test_read_name_follows_a_backward_pointer() -> None:
    first = encode_name("example.org.")
    message = header() + first + b"\x03www" + b"\xc0\x0c"
    name, end = read_name(message, 12 + len(first))
    assert name == encode_name("www.example.org.")
    assert end == len(message)  # just after the pointer, not where it led


def test_read_name_follows_a_chain_of_pointers() -> None:
    # "org" at 12, "example" + ptr(12) at 17, "www" + ptr(17) at 27, ptr(27) at 33
    message = header() + b"\x03org\x00" + b"\x07example\xc0\x0c" + b"\x03www\xc0\x11" + b"\xc0\x1b"
    name, end = read_name(message, 33)
    assert name == encode_name("www.example.org.")
    assert end == 35


@pytest.mark.parametrize(
    ("tail", "start"),
    [
        (b"\xc0\x0c", 12),  # points at itself
        (b"\xc0\x0e", 12),  # points forward
        (b"\xc0\x05", 12),  # points into the header
        (b"\x01a\xc0\x0c", 12),  # label, then back to its own start: a loop
        (b"\xc0\x0e\xc0\x0c", 14),  # 14 -> 12 -> 14: a loop through two pointers
    ],
    ids=["self", "forward", "header", "label-loop", "two-pointer-loop"],
)
def test_read_name_rejects_pointers_that_do_not_point_back(tail: bytes, start: int) -> None:
    with pytest.raises(DnsFormatError, match="point"):
        read_name(header() + tail, start)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x03ww", "past the end"),
        (b"\x03www", "past the end"),
        (b"\xc0", "cut short"),
        (b"\x41abc\x00", "label type"),
        (b"\x81abc\x00", "label type"),
        (b"".join(b"\x3f" + c * 63 for c in (b"a", b"b", b"c", b"d")) + b"\x00", "longer"),
    ],
    ids=["short-label", "no-terminator", "half-pointer", "type-01", "type-10", "too-long"],
)  # fmt: skip
def test_read_name_rejects_malformed(body: bytes, match: str) -> None:
    with pytest.raises(DnsFormatError, match=match):
        read_name(header() + body, 12)


def test_name_of_253_characters_is_fine() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]) + "."
    wire = encode_name(name)
    assert len(wire) == 255
    assert read_name(header() + wire, 12)[0] == wire


def test_name_text_escapes_odd_bytes() -> None:
    assert name_text(b"\x03a.b\x02\x00z\x00") == "a\\046b.\\000z."
    assert name_text(b"\x00") == "."


# -- queries ---------------------------------------------------------------------------


def test_parse_query_reads_question_and_default_udp_size() -> None:
    message = build_query("WWW.Example.ORG.", TYPE_A, qid=0xBEEF)
    query = parse_query(message)
    assert query.id == 0xBEEF
    assert query.message == message
    assert query.question.name == encode_name("WWW.Example.ORG.")
    assert (query.question.qtype, query.question.qclass) == (TYPE_A, CLASS_IN)
    assert query.question.key == (encode_name("www.example.org."), TYPE_A, CLASS_IN)
    assert query.question_bytes == message[12:]
    assert query.udp_payload_size == CLASSIC_UDP_PAYLOAD


@pytest.mark.parametrize(
    ("advertised", "honoured"),
    [(1232, 1232), (100, CLASSIC_UDP_PAYLOAD), (65000, MAX_UDP_PAYLOAD)],
)
def test_parse_query_honours_edns0_udp_size_within_bounds(advertised: int, honoured: int) -> None:
    query = parse_query(build_query("example.org.", edns=advertised))
    assert query.udp_payload_size == honoured
    assert query.question_bytes == encode_name("example.org.") + b"\x00\x01\x00\x01"


@pytest.mark.parametrize(
    "message",
    [b"", b"\x12\x34", header()[:11], header(flags=0x8180) + encode_name("a.") + b"\0\1\0\1"],
    ids=["empty", "two-bytes", "eleven-bytes", "a-response"],
)
def test_unanswerable_queries_are_dropped(message: bytes) -> None:
    with pytest.raises(BadQuery) as caught:
        parse_query(message)
    assert caught.value.reply is None


@pytest.mark.parametrize(
    "message",
    [
        header(qd=0),
        header(qd=2) + (encode_name("a.") + b"\0\1\0\1") * 2,
        header() + b"\x03www",
        header() + encode_name("a.") + b"\x00\x01",
        header() + b"\xc0\x0c\x00\x01\x00\x01",
        header(ar=1) + encode_name("a.") + b"\0\1\0\1" + b"\x00\x00\x29",
        header(ar=2) + encode_name("a.") + b"\0\1\0\1" + opt_rr(1232) * 2,
        header(ar=1) + encode_name("a.") + b"\0\1\0\1" + b"\x01x" + opt_rr(1232),
    ],
    ids=[
        "no-question",
        "two-questions",
        "cut-name",
        "cut-type",
        "pointer-loop",
        "cut-additional",
        "two-opt",
        "opt-not-root",
    ],
)
def test_malformed_queries_get_formerr_with_their_id(message: bytes) -> None:
    with pytest.raises(BadQuery) as caught:
        parse_query(message)
    reply = caught.value.reply
    assert reply is not None
    decoded = decode(reply)
    assert decoded.id == 7
    assert decoded.qr and decoded.rcode == RCODE_FORMERR
    assert decoded.flags & 0x0100  # RD copied
    assert decoded.qdcount == 0 and len(reply) == 12


def test_other_opcodes_get_notimp() -> None:
    with pytest.raises(BadQuery) as caught:
        parse_query(header(flags=0x2800) + encode_name("a.") + b"\0\6\0\1")  # UPDATE
    assert caught.value.reply is not None
    decoded = decode(caught.value.reply)
    assert decoded.rcode == RCODE_NOTIMP
    assert (decoded.flags >> 11) & 0xF == 5


# -- responses and TTLs ----------------------------------------------------------------


def positive(query: bytes, ttls: tuple[int, ...] = (300, 60), *, opt: bool = True) -> bytes:
    answer = tuple(rr(POINTER_TO_QUESTION, TYPE_A, t, a_record("192.0.2.1")) for t in ttls)
    ns = rr(encode_name("example.org."), 2, 900, encode_name("ns.example.org."))
    extra = (opt_rr(1232),) if opt else ()
    return build_response(query, answers=answer, authority=(ns,), additional=extra)


def negative(query: bytes, *, rcode: int = 3, soa_ttl: int = 3600, minimum: int = 120) -> bytes:
    soa = rr(encode_name("example.org."), TYPE_SOA, soa_ttl, soa_rdata(minimum))
    return build_response(query, authority=(soa,), rcode=rcode)


def test_parse_response_min_ttl_over_answer_and_authority_only() -> None:
    query = build_query("www.example.org.")
    info = parse_response(positive(query, (300, 60)))
    assert info.min_ttl == 60
    assert info.soa_minimum is None
    assert len(info.ttl_offsets) == 3  # two answers, one NS; the OPT's "TTL" is flags
    assert answers(info, parse_query(query))
    assert cache_lifetime(info, max_ttl=3600, max_negative_ttl=300) == 60
    assert cache_lifetime(info, max_ttl=30, max_negative_ttl=300) == 30


def test_ttl_with_top_bit_set_counts_as_zero() -> None:
    query = build_query("www.example.org.")
    info = parse_response(positive(query, (0x8000_0001,)))
    assert info.min_ttl == 0
    assert cache_lifetime(info, max_ttl=3600, max_negative_ttl=300) == 0


@pytest.mark.parametrize(
    ("rcode", "soa_ttl", "minimum", "expected"),
    [
        (3, 3600, 120, 120),  # NXDOMAIN: the SOA minimum
        (0, 3600, 120, 120),  # NODATA too
        (3, 30, 120, 30),  # the SOA's own TTL when lower (RFC 2308 §5)
        (3, 3600, 86400, 300),  # capped
    ],
)
def test_negative_answers_live_for_the_soa_minimum(
    rcode: int, soa_ttl: int, minimum: int, expected: int
) -> None:
    query = build_query("nope.example.org.")
    info = parse_response(negative(query, rcode=rcode, soa_ttl=soa_ttl, minimum=minimum))
    assert info.soa_minimum == min(soa_ttl, minimum)
    assert cache_lifetime(info, max_ttl=3600, max_negative_ttl=300) == expected


@pytest.mark.parametrize(
    "response",
    [
        build_response(build_query("a.example."), rcode=RCODE_SERVFAIL),
        build_response(build_query("a.example."), rcode=3),  # NXDOMAIN without an SOA
        build_response(build_query("a.example.")),  # NODATA without an SOA
        build_response(build_query("a.example."), rcode=5),  # REFUSED
        build_response(
            build_query("a.example."),
            answers=(rr(POINTER_TO_QUESTION, TYPE_A, 300, a_record("192.0.2.1")),),
            extra_flags=0x0200,
        ),  # truncated
    ],
    ids=["servfail", "nxdomain-no-soa", "nodata-no-soa", "refused", "truncated"],
)
def test_uncacheable_responses(response: bytes) -> None:
    info = parse_response(response)
    assert cache_lifetime(info, max_ttl=3600, max_negative_ttl=300) == 0


def test_parse_response_rejects_queries_and_garbage() -> None:
    query = build_query("a.example.")
    with pytest.raises(DnsFormatError, match="query"):
        parse_response(query)
    with pytest.raises(DnsFormatError):
        parse_response(positive(query)[:-3])
    with pytest.raises(DnsFormatError):
        parse_response(b"\x00" * 5)
    short_soa = rr(encode_name("example."), TYPE_SOA, 60, b"\x00\x00" + b"\x00" * 10)
    with pytest.raises(DnsFormatError, match="SOA"):
        parse_response(build_response(query, authority=(short_soa,), rcode=3))


def test_answers_compares_the_question_case_insensitively() -> None:
    query = parse_query(build_query("WWW.example.ORG."))
    assert answers(parse_response(positive(build_query("www.EXAMPLE.org."))), query)
    assert not answers(parse_response(positive(build_query("other.example.org."))), query)
    assert not answers(parse_response(positive(build_query("www.example.org.", 28))), query)


# -- building answers ------------------------------------------------------------------


def test_servfail_keeps_id_question_and_rd() -> None:
    message = build_query("www.example.org.", qid=0x4242, edns=1232)
    query = parse_query(message)
    decoded = decode(servfail(query))
    assert decoded.id == 0x4242
    assert decoded.qr and decoded.rcode == RCODE_SERVFAIL
    assert decoded.flags & 0x0180 == 0x0180  # RD and RA
    assert decoded.question == ("www.example.org.", TYPE_A, CLASS_IN)
    assert decoded.ancount == 0


def big_txt_response(query: bytes, count: int = 20) -> bytes:
    records = tuple(
        rr(POINTER_TO_QUESTION, TYPE_TXT, 300, txt_rdata(b"x" * 60)) for _ in range(count)
    )
    return build_response(query, answers=records)


def test_fit_udp_truncates_beyond_the_client_size() -> None:
    message = build_query("big.example.", TYPE_TXT, qid=9)
    response = big_txt_response(message)
    assert len(response) > 1232
    small = parse_query(message)
    cut = fit_udp(response, small)
    assert cut == truncate(response, small)
    decoded = decode(cut)
    assert decoded.tc and decoded.qr and decoded.id == 9
    assert decoded.ancount == 0 and decoded.qdcount == 1
    assert decoded.question == ("big.example.", TYPE_TXT, CLASS_IN)
    assert len(cut) == 12 + len(small.question_bytes)
    roomy = parse_query(build_query("big.example.", TYPE_TXT, edns=4096))
    assert fit_udp(response, roomy) == response


def test_fit_udp_keeps_a_512_byte_answer() -> None:
    message = build_query("e.example.", TYPE_TXT)
    room = 512 - len(message) - len(POINTER_TO_QUESTION) - 10
    response = build_response(message, answers=(rr(POINTER_TO_QUESTION, TYPE_TXT, 1, b"y" * room),))
    assert len(response) == 512
    assert fit_udp(response, parse_query(message)) == response
    longer = build_response(
        message, answers=(rr(POINTER_TO_QUESTION, TYPE_TXT, 1, b"y" * (room + 1)),)
    )
    assert decode(fit_udp(longer, parse_query(message))).tc


def test_personalize_rewrites_id_spelling_and_ttls() -> None:
    original = build_query("WWW.example.org.", qid=1)
    response = positive(original, (300, 5))
    info = parse_response(response)
    asker = parse_query(build_query("www.EXAMPLE.org.", qid=2))
    out = decode(personalize(response, asker, ttl_offsets=info.ttl_offsets, age=10))
    assert out.id == 2
    assert out.question == ("www.EXAMPLE.org.", TYPE_A, CLASS_IN)
    assert [ttl for _type, ttl, _rdata in out.answers] == [290, 0]
    assert with_id(response, 3)[:2] == b"\x00\x03"


# -- the cache -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached(cache: DnsCache, name: str, *, ttls: tuple[int, ...] = (60,), qid: int = 1) -> Query:
    message = build_query(name, qid=qid)
    query = parse_query(message)
    response = positive(message, ttls, opt=False)
    info = parse_response(response)
    cache.put(
        query, response, info, lifetime=cache_lifetime(info, max_ttl=3600, max_negative_ttl=300)
    )
    return query


def test_cache_hit_rewrites_id_and_ages_ttls_then_expires() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    cached(cache, "www.example.org.", ttls=(60,))
    asker = parse_query(build_query("WWW.example.org.", qid=77))
    clock.now += 20.5
    hit = cache.get(asker)
    assert hit is not None
    decoded = decode(hit)
    assert decoded.id == 77
    assert decoded.question[0] == "WWW.example.org."
    assert decoded.answers[0][1] == 40
    clock.now += 39.5
    assert cache.get(asker) is None  # 60 s after it was stored
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_is_keyed_by_type_and_skips_zero_lifetimes() -> None:
    cache = DnsCache(clock=Clock())
    cached(cache, "a.example.")
    assert cache.get(parse_query(build_query("a.example.", 28))) is None
    cached(cache, "zero.example.", ttls=(0,))
    assert cache.get(parse_query(build_query("zero.example."))) is None
    assert len(cache) == 1


def test_cache_keeps_rd_cd_and_do_variants_apart() -> None:
    cache = DnsCache(clock=Clock())
    cached(cache, "v.example.")  # RD=1, no EDNS
    variants = [
        build_query("v.example.", flags=0x0000),  # RD=0
        build_query("v.example.", flags=0x0110),  # CD=1
        build_query("v.example.", edns=1232)[:-6] + struct.pack("!IH", 0x8000, 0),  # DO=1
    ]
    assert parse_query(variants[2]).dnssec_ok
    for message in variants:
        assert cache.get(parse_query(message)) is None
    assert cache.get(parse_query(build_query("V.example.", edns=1232))) is not None  # DO=0


def test_cache_evicts_the_least_recently_used() -> None:
    cache = DnsCache(max_entries=2, clock=Clock())
    first = cached(cache, "one.example.")
    second = cached(cache, "two.example.")
    assert cache.get(first) is not None  # "one" is now the most recent
    cached(cache, "three.example.")
    assert cache.get(second) is None
    assert cache.get(first) is not None
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0

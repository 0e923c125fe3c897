"""The relay: transparent per-container TCP listeners that tunnel every
connection through the container's upstream proxy (SOCKS5, HTTP CONNECT, or
HTTP CONNECT over TLS), per-container DNS endpoints that ask the container's
DNS servers through that same proxy, plus the upstream health probe.

Package face: the private modules below are re-exported here.

    _relay          Relay: listeners (accept callbacks), loop guard, DNS endpoints
    _connections    an accepted connection: spliced or TLS path, registry, log lines
    _spliced        SplicedConnection: connect, handshake, relay as callbacks (no task)
    _flow           one direction: buffered, then spliced; half-close; read masking
    _poller         EdgePoller: edge-triggered epoll of our own inside the loop
    _deadlines      DeadlineQueue: one timer for all connections' timeouts
    _pipes          PipePool: pipes for splice(2), lent while bytes are in flight
    _sockets        listening TCP sockets and UDP endpoints (FREEBIND, REUSEADDR)
    _dns            per-container DNS endpoints: UDP protocol, TCP server
    _dns_resolver   DnsResolver: cache, then servers in order through the upstream
    _dns_pool       DNS-over-TCP framing; pool of idle tunnels per server
    _dns_cache      DnsCache: TTL-respecting LRU of answers, sans-IO
    _dns_wire       DNS wire format, sans-IO: parse, min TTL, SERVFAIL, truncation
    _original_dst   SO_ORIGINAL_DST reader (pure sockaddr parsing + getsockopt)
    _upstream       dial a proxy, TLS, drive a handshake -> Tunnel
    _socks5         SOCKS5 client handshake, sans-IO (RFC 1928, RFC 1929)
    _http_connect   HTTP CONNECT client handshake, sans-IO
    _events         events and helpers shared by the handshakes
    _channel        Channel protocol; SocketChannel (plain socket, half-close, abort)
    _tls            TlsChannel: TLS over MemoryBIO, so https tunnels can half-close too
    _pump           pump(): buffered copy both ways over channels (https tunnels)
    _probe          probe_upstream() -> ProbeResult
    _tasks          TaskSet: the one way tasks are started
    _errors         UpstreamConnectRejected (a refined UpstreamProtocolError)

Concurrency model: single asyncio event loop (uvloop in the daemon); see ``_relay``.
"""

from egressd.relay._dns_resolver import DnsOptions
from egressd.relay._errors import UpstreamConnectRejected
from egressd.relay._events import Authenticated, SendBytes, TunnelReady
from egressd.relay._http_connect import HttpConnectHandshake
from egressd.relay._original_dst import original_destination, parse_sockaddr
from egressd.relay._probe import ProbeResult, probe_upstream
from egressd.relay._relay import Relay
from egressd.relay._socks5 import Socks5Handshake
from egressd.relay._upstream import Tunnel, open_tunnel

__all__ = [
    "Authenticated",
    "DnsOptions",
    "HttpConnectHandshake",
    "ProbeResult",
    "Relay",
    "SendBytes",
    "Socks5Handshake",
    "Tunnel",
    "TunnelReady",
    "UpstreamConnectRejected",
    "open_tunnel",
    "original_destination",
    "parse_sockaddr",
    "probe_upstream",
]

"""Health probe of an upstream proxy: is it there, and does it take our credentials?

* ``socks5``: method negotiation, plus RFC 1929 auth when credentials are
  configured, then stop (no CONNECT is made).
* ``http`` / ``https``: TLS for ``https``, then ``CONNECT 127.0.0.1:9`` (the
  proxy's own discard port). Any answer but 407/401 proves our credentials
  passed: a refused CONNECT (403, 502, ...) is still a healthy proxy.

Latency is the time from the first connect attempt to the proving answer.
Concurrency model: one coroutine per probe; everything it opens is closed
before it returns, also when cancelled.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from egressd.errors import UpstreamAuthFailed, UpstreamError, UpstreamUnreachable
from egressd.model import NetworkType, ProxySpec
from egressd.relay._errors import UpstreamConnectRejected
from egressd.relay._upstream import dial, make_handshake

PROBE_DESTINATION: tuple[str, int] = ("127.0.0.1", 9)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found.

    ``reachable`` means the proxy answered at the protocol level; a proxy
    that refuses our credentials is reachable with ``auth_failed`` set.
    ``healthy`` is the summary: reachable and no error.
    """

    reachable: bool
    latency_ms: float | None
    error: str | None
    auth_failed: bool

    @property
    def healthy(self) -> bool:
        return self.reachable and self.error is None


async def probe_upstream(
    spec: ProxySpec,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    probe_destination: tuple[str, int] = PROBE_DESTINATION,
) -> ProbeResult:
    """Probe ``spec`` once, bounded by ``timeout`` overall. Never raises for proxy faults."""
    loop = asyncio.get_running_loop()
    destination = None if spec.scheme is NetworkType.SOCKS5 else probe_destination
    handshake = make_handshake(spec, destination)
    started = loop.time()

    def elapsed_ms() -> float:
        return round((loop.time() - started) * 1000.0, 3)

    try:
        async with asyncio.timeout(timeout):
            tunnel = await dial(
                spec,
                handshake,
                connect_timeout=timeout,
                handshake_timeout=timeout,
                ssl_context=ssl_context,
            )
            latency = elapsed_ms()
    except UpstreamConnectRejected:
        return ProbeResult(reachable=True, latency_ms=elapsed_ms(), error=None, auth_failed=False)
    except UpstreamAuthFailed as exc:
        return ProbeResult(
            reachable=True, latency_ms=elapsed_ms(), error=str(exc), auth_failed=True
        )
    except UpstreamUnreachable as exc:
        return ProbeResult(reachable=False, latency_ms=None, error=str(exc), auth_failed=False)
    except UpstreamError as exc:
        return ProbeResult(
            reachable=True, latency_ms=elapsed_ms(), error=str(exc), auth_failed=False
        )
    except TimeoutError:
        return ProbeResult(
            reachable=False,
            latency_ms=None,
            error=f"{spec.endpoint_url} gave no complete answer within {timeout:g}s",
            auth_failed=False,
        )
    # Outside the timeout: the answer is in; closing must not turn it into a failure.
    await tunnel.channel.close()
    return ProbeResult(reachable=True, latency_ms=latency, error=None, auth_failed=False)

"""The relay's building blocks alone: pump over socket pairs, TlsChannel half-close,
SO_ORIGINAL_DST parsing, the TaskSet helper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from pathlib import Path

import pytest

from egressd.relay import parse_sockaddr
from egressd.relay._channel import SocketChannel
from egressd.relay._pump import pump
from egressd.relay._tasks import TaskSet
from egressd.relay._tls import TlsChannel
from tests.unit.test_relay_peers import LOOPBACK, Pki, async_test


@async_test
async def test_pump_propagates_eof_each_way_and_counts() -> None:
    client_app, client_relay = socket.socketpair()
    upstream_relay, upstream_app = socket.socketpair()
    loop = asyncio.get_running_loop()
    with client_app, upstream_app:
        for sock in (client_app, upstream_app):
            sock.setblocking(False)
        client, upstream = SocketChannel(client_relay), SocketChannel(upstream_relay)
        task = asyncio.create_task(pump(client, upstream))
        await loop.sock_sendall(client_app, b"request")
        client_app.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(upstream_app, 100) == b"request"
        assert await loop.sock_recv(upstream_app, 100) == b""  # EOF passed on
        await loop.sock_sendall(upstream_app, b"response")
        upstream_app.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(client_app, 100) == b"response"
        assert await loop.sock_recv(client_app, 100) == b""
        assert await task == (7, 8)
        await client.close()
        await upstream.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of loopback TCP sockets (socketpair() is AF_UNIX only)."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        one = socket.create_connection(listener.getsockname())
        two, _ = listener.accept()
    return one, two


@async_test
async def test_pump_raises_on_reset_and_stops_both_directions() -> None:
    client_app, client_relay = tcp_pair()
    upstream_relay, upstream_app = tcp_pair()
    with client_app, client_relay, upstream_relay:
        client_app.setblocking(False)
        client, upstream = SocketChannel(client_relay), SocketChannel(upstream_relay)
        task = asyncio.create_task(pump(client, upstream))
        await asyncio.sleep(0.05)
        SocketChannel(upstream_app).abort()  # the destination vanishes with RST
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(task, 5)
        client.abort()  # what the connection task does next: the client sees RST too
        with pytest.raises(ConnectionResetError):
            await asyncio.get_running_loop().sock_recv(client_app, 10)


@async_test
async def test_tls_channel_half_close(tmp_path: Path) -> None:
    """close_notify + FIN go out, and the answer sent after them still comes back."""
    pki = Pki(tmp_path)
    server_context = pki.server_context()

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            received = b""
            while data := tls.recv(4096):  # b"" once close_notify arrives
                received += data
            tls.sendall(b"after your eof: " + received)
            with contextlib.suppress(OSError):
                tls.unwrap()

    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        server = asyncio.create_task(asyncio.to_thread(serve, listener))
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, listener.getsockname())
        channel = await TlsChannel.connect(
            sock, context=pki.client_context(), server_hostname=LOOPBACK
        )
        try:
            await channel.send_all(b"question")
            await channel.shutdown_write()
            answer = b""
            while data := await channel.recv():
                answer += data
        finally:
            await channel.close()
        await server
    assert answer == b"after your eof: question"


# -- SO_ORIGINAL_DST ---------------------------------------------------------------------


def _family(value: int) -> bytes:
    return value.to_bytes(2, sys.byteorder)  # sa_family is in host byte order


def test_parse_sockaddr_in() -> None:
    raw = _family(socket.AF_INET) + (8080).to_bytes(2, "big") + bytes([198, 18, 2, 2]) + bytes(8)
    assert parse_sockaddr(raw) == ("198.18.2.2", 8080)


def test_parse_sockaddr_in6() -> None:
    address = socket.inet_pton(socket.AF_INET6, "2001:db8::42")
    raw = _family(socket.AF_INET6) + (443).to_bytes(2, "big") + bytes(4) + address + bytes(4)
    assert parse_sockaddr(raw) == ("2001:db8::42", 443)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x02\x00", _family(socket.AF_UNIX) + bytes(14), _family(socket.AF_INET6) + bytes(10)],
)
def test_parse_sockaddr_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sockaddr(raw)


def test_original_destination_of_a_connection_that_was_not_redirected() -> None:
    from egressd.relay import original_destination

    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as _client:
            accepted, _ = listener.accept()
            with accepted:
                try:
                    found = original_destination(accepted)
                except OSError:
                    return  # ENOENT: no conntrack entry (no NAT loaded here)
                # conntrack is active: the "original" is where we really are.
                assert found == listener.getsockname()


# -- TaskSet -----------------------------------------------------------------------------


@async_test
async def test_task_set_keeps_references_and_logs_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet("test", logger=logging.getLogger("egressd.relay.test"))

    async def fail() -> None:
        raise RuntimeError("boom")

    async def sleep_forever() -> None:
        await asyncio.Event().wait()

    failing = tasks.spawn(fail(), name="failing")
    sleeper = tasks.spawn(sleep_forever(), name="sleeper")
    assert len(tasks) == 2
    with contextlib.suppress(RuntimeError):
        await failing
    await asyncio.sleep(0)
    assert len(tasks) == 1
    assert "task failing failed" in caplog.text
    await tasks.cancel_all()
    assert len(tasks) == 0 and sleeper.cancelled()
    assert "sleeper" not in caplog.text  # cancellation is not a failure

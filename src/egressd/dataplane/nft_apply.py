"""Applying and listing nftables through the ``nft`` binary.

The only place in egressd that starts a subprocess. Not libnftables in
process, although a call would cost ~0.4 ms instead of ~4 ms: libnftables
1.0.6 waits on its netlink socket with ``select()``, and glibc aborts the
whole process when that socket's fd is 1024 or more -- which it is in a
daemon holding a listener and DNS sockets for hundreds of containers
(seen in the 1000-container benchmark). Scripts go to
``nft -f -`` on stdin (one script, one kernel transaction); arguments are
fixed lists, never a shell. In a container namespace, ``nft`` is started
from a thread that has entered it (see :mod:`egressd.dataplane.netns`), so
no ``nsenter`` is needed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

from egressd import gil
from egressd.dataplane.names import validate_table
from egressd.dataplane.netns import run_in_netns
from egressd.errors import KernelError

NFT_TIMEOUT_S = 30.0


def nft_available() -> bool:
    return shutil.which("nft") is not None


def _nft(args: list[str], *, stdin: str | None, netns_path: str | None) -> str:
    binary = shutil.which("nft")
    if binary is None:
        raise KernelError("nft binary not found in PATH")
    argv = [binary, *args]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT_S,
            check=False,
        )

    try:
        proc = run() if netns_path is None else run_in_netns(netns_path, run)
    except subprocess.TimeoutExpired:
        raise KernelError(f"nft {' '.join(args)}: timed out") from None
    except OSError as exc:
        raise KernelError(f"nft {' '.join(args)}: {exc.strerror}", errno=exc.errno) from None
    if proc.returncode != 0:
        where = f" in {netns_path}" if netns_path else ""
        raise KernelError(f"nft {' '.join(args)}{where} failed: {proc.stderr.strip()}")
    return proc.stdout


def apply_script(script: str, *, netns_path: str | None = None) -> None:
    """Commit ``script`` as one transaction (nothing to do for an empty one)."""
    if script.strip():
        _nft(["-f", "-"], stdin=script, netns_path=netns_path)


def list_table(table: str, *, netns_path: str | None = None) -> dict[str, Any] | None:
    """``nft -j list table inet <table>`` parsed, or None when there is no such table.

    One process, not a "does it exist" listing first: the agent lists every
    container's wall on each resync.
    """
    validate_table(table)
    try:
        out = _nft(["-j", "list", "table", "inet", table], stdin=None, netns_path=netns_path)
    except KernelError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    return parse_listing(out)


def list_items(what: list[str], *, netns_path: str | None = None) -> list[dict[str, Any]] | None:
    """The items of ``nft -j list <what...>`` (e.g. ``["map", "inet", t, name]``).

    None when the object (or its table) does not exist. For reads that need
    one set or map rather than a whole table with every rule in it.
    """
    try:
        out = _nft(["-j", "list", *what], stdin=None, netns_path=netns_path)
    except KernelError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    items = parse_listing(out).get("nftables", [])
    return [item for item in items if isinstance(item, dict) and "metainfo" not in item]


_LISTING_HEAD = re.compile(r'\s*\{\s*"nftables"\s*:\s*\[\s*')
_SEPARATOR = re.compile(r"\s*,\s*")
_TAIL = re.compile(r"\s*\]\s*\}\s*")
_decoder = json.JSONDecoder()


def parse_listing(text: str) -> dict[str, Any]:
    """``nft -j`` output, ``{"nftables": [item, ...]}``, parsed one item at a time.

    The host table holds a few kB per container, megabytes at a thousand:
    one ``json.loads`` of that holds the GIL for a couple of hundred
    milliseconds, during which the event loop beside the agent (API, relay)
    stands still. Item by item, the interpreter can switch threads between
    items. Anything else than that shape is parsed as a whole.
    """
    head = _LISTING_HEAD.match(text)
    if head is None:
        whole: dict[str, Any] = json.loads(text)
        return whole
    items: list[Any] = []
    pos = head.end()
    while not _TAIL.fullmatch(text, pos):
        if items:
            separator = _SEPARATOR.match(text, pos)
            if separator is None:
                raise ValueError(f"nft listing: expected ',' at {pos}")
            pos = separator.end()
        item, pos = _decoder.raw_decode(text, pos)
        items.append(item)
        gil.breathe()
    return {"nftables": items}

"""A private, real Podman for tests: own storage, state, runc root, cgroups and API socket.

Nothing of the machine's Podman is read or written. Every place podman and
runc write to is under one temp dir ``egt-podman-XXXX``::

    podman --root D/root --runroot D/runroot --tmpdir D/tmp --storage-driver vfs
           --runtime D/bin/runc --cgroup-manager cgroupfs --events-backend file
           --network-config-dir D/cni ...

where ``D/bin/runc`` is ``exec runc --root D/runc "$@"`` (``--runtime-flag``
would not reach the cleanup command conmon runs when a container exits).

Containers run from an exploded busybox-static rootfs (``--rootfs D/rootfs``):
no registry, and no image either (``podman import`` would write the global
``/var/lib/containers/cache`` blob-info cache). Each runs ``sleep 600`` with
``--network none`` (egressd adds the only interface, ``egress0``) under the
cgroup parent ``/egt-pod-<hex>``. The Docker-compatible API is
``podman system service --time=0 unix://D/api.sock``, our child.

On exit, even after a failure: containers removed (``rm -f -t 0``), the
service stopped by PID, conmon and its cleanup commands (their command
lines name D) waited for and, if need be, killed by PID, leftover mounts
under D unmounted, our cgroups and D removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Self

from tests.integration.peers import run

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "nc", "cat", "echo", "ip")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def busybox_is_static() -> bool:
    if not BUSYBOX.exists():
        return False
    out = run(["ldd", str(BUSYBOX)], check=False)
    return "not a dynamic executable" in out.stdout + out.stderr


class PodmanSandbox:
    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.dir = Path(tempfile.mkdtemp(prefix="egt-podman-"))
        self.socket_path = self.dir / "api.sock"
        self.rootfs = self.dir / "rootfs"
        self.cgroup_parent = f"/egt-pod-{self.suffix}"
        self.containers: list[str] = []
        self.service: subprocess.Popen[bytes] | None = None

    def base(self) -> list[str]:
        d = self.dir
        return [
            "podman",
            "--root", f"{d}/root",
            "--runroot", f"{d}/runroot",
            "--tmpdir", f"{d}/tmp",
            "--storage-driver", "vfs",
            "--runtime", f"{d}/bin/runc",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--network-config-dir", f"{d}/cni",
        ]  # fmt: skip

    def podman(
        self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base(), *args], check=check, stdin=stdin, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._write_runc_wrapper()
            self._build_rootfs()
            self._start_service()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_runc_wrapper(self) -> None:
        # The exit command conmon runs (`podman container cleanup`) keeps --runtime but
        # not --runtime-flag: a wrapper is the only way runc never uses /run/runc.
        runc = shutil.which("runc")
        if runc is None:
            raise RuntimeError("runc not found")
        wrapper = self.dir / "bin" / "runc"  # basename "runc": podman keys features on it
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec {runc} --root {self.dir}/runc "$@"\n')
        wrapper.chmod(0o755)

    def _build_rootfs(self) -> None:
        for sub in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            (self.rootfs / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, self.rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (self.rootfs / "bin" / applet).symlink_to("busybox")

    def _start_service(self) -> None:
        log = (self.dir / "service.log").open("ab")
        self.service = subprocess.Popen(
            [*self.base(), "system", "service", "--time=0", f"unix://{self.socket_path}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.service.poll() is not None:
                raise RuntimeError(f"podman system service exited:\n{self.service_log()}")
            if self._ping():
                return
            time.sleep(0.1)
        raise TimeoutError(f"podman API did not come up:\n{self.service_log()}")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
                status_line = s.recv(64)
        except OSError:
            return False
        return status_line.startswith(b"HTTP/1.") and b" 200 " in status_line

    def service_log(self) -> str:
        path = self.dir / "service.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        """Every cleanup step runs, whatever an earlier one raised; the first error is raised."""
        failures: list[BaseException] = []
        for step in (
            self._remove_containers,
            self._stop_service,
            self._reap_our_processes,
            self._unmount_all,
            self._remove_cgroups,
        ):
            try:
                step()
            except Exception as exc:
                failures.append(exc)
        if not os.environ.get("EGT_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        if failures:
            raise failures[0]

    def _remove_containers(self) -> None:
        for name in reversed(self.containers):
            self.podman("rm", "-f", "-t", "0", name, check=False)
        self.containers.clear()

    def _stop_service(self) -> None:
        if self.service is None:
            return
        if self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(timeout=10)
        self.service = None

    def _our_processes(self) -> list[int]:
        """conmon and the ``podman container cleanup`` it runs name our dir in their argv."""
        marker = str(self.dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with suppress(OSError):
                    stat = (entry / "stat").read_text()
                    zombie = stat[stat.rindex(")") + 2] == "Z"
                    if not zombie and marker in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
        return found

    def _reap_our_processes(self) -> None:
        """Let conmon finish its exit work, then SIGKILL what is left; by PID."""
        for sig, grace in ((None, 10.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                for pid in self._our_processes():
                    with suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self._our_processes():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
        raise RuntimeError(f"processes of {self.dir} survived SIGKILL: {self._our_processes()}")

    def _unmount_all(self) -> None:
        prefix = str(self.dir) + "/"
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)
        ]
        for target in reversed(mounts):
            run(["umount", "-l", target], check=False)

    def _remove_cgroups(self) -> None:
        name = self.cgroup_parent.lstrip("/")
        for hierarchy in CGROUP_ROOT.iterdir():
            top = hierarchy / name
            if not top.is_dir():
                continue
            for sub in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                with suppress(OSError):
                    sub.rmdir()
            with suppress(OSError):
                top.rmdir()

    # -- containers --------------------------------------------------------------

    def run_container(self, name: str | None = None) -> str:
        """Start ``sleep 600`` in a new container with no network; its name."""
        name = name or f"egt-pod-{secrets.token_hex(3)}"
        self.containers.append(name)
        self.podman(
            "run", "-d", "--name", name,
            "--network", "none",
            "--cgroup-parent", self.cgroup_parent,
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            "--rootfs", str(self.rootfs),
            "/bin/sleep", "600",
        )  # fmt: skip
        return name

    def pid(self, name: str) -> int:
        return int(self.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())

    def exec(
        self, name: str, *argv: str, stdin: str | None = None, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        args = ["exec", "-i", name, *argv] if stdin is not None else ["exec", name, *argv]
        return self.podman(*args, check=False, stdin=stdin, timeout=timeout)

    def http_get(self, name: str, ip: str, port: int = 80) -> subprocess.CompletedProcess[str]:
        """An HTTP/1.0 GET made from inside the container with busybox ``nc``."""
        request = f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n"
        return self.exec(name, "/bin/nc", "-w", "5", ip, str(port), stdin=request)

"""Debian's redis-server as a process of the test's own: 127.0.0.1, a free port, a
password, nothing written to disk. Stopped and started again on the same port, so a
test can take it away from the gateways and give it back.

    with redis_server(tmp_path) as redis: ...   # redis.url, redis.password

Skips (naming what is missing) only where the binary is not installed: `make setup`
installs it (hack/get-redis.sh).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from fabric_operator.localcluster import free_port

BINARY = "redis-server"


@dataclass
class RedisServer:
    port: int
    password: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which(BINARY)
        assert binary is not None
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child writes it
        self.proc = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *("--requirepass", self.password, "--dir", str(self.workdir)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = (self.workdir / "redis.log").read_text()
                raise RuntimeError(f"redis-server exited: {log_text}")
            if self.ping():
                return
            time.sleep(0.02)
        raise TimeoutError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        """SIGKILL: gone at once, as a crashed or unreachable server would be."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as a hung server's."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                got = b""
                while b"PONG" not in got and len(got) < 200:
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    got += chunk
                return b"+PONG" in got
        except OSError:
            return False

    def command(self, *words: str) -> bytes:
        """One command's raw reply (for looking at keys)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            wire = f"AUTH {self.password}\r\n".encode()
            wire += f"*{len(words)}\r\n".encode()
            for w in words:
                wire += f"${len(w.encode())}\r\n{w}\r\n".encode()
            s.sendall(wire)
            with s.makefile("rb") as replies:
                return _reply(replies) + _reply(replies)  # AUTH's, then the command's


def _reply(replies: BinaryIO) -> bytes:
    """One whole RESP reply, raw (read to its end: no waiting and hoping)."""
    line = replies.readline()
    kind, size = line[:1], line[1:-2]
    if kind == b"$" and int(size) >= 0:
        return line + replies.read(int(size) + 2)
    if kind == b"*":
        return line + b"".join(_reply(replies) for _ in range(max(int(size), 0)))
    return line  # +simple, -error, :integer, $-1


@contextlib.contextmanager
def redis_server(workdir: Path, password: str = "test-redis-pass-7d1e") -> Iterator[RedisServer]:
    if shutil.which(BINARY) is None:
        pytest.skip(f"{BINARY} not found (Debian package redis-server: hack/get-redis.sh)")
    server = RedisServer(free_port(), password, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()

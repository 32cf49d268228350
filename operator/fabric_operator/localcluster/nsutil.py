"""Linux namespaces and process lifetimes, for the local cluster's nodes.

A node's processes live in network, mount and PID namespaces of their own (what kind gets
from a container): when the node's first process dies, the kernel kills every process of
the node, and its mounts and network namespaces go with them, so nothing is left on the
host even after a SIGKILL. Every process started here also dies with the process that
started it (`PR_SET_PDEATHSIG`, set by `setpriv` before it executes the program), so a
killed test run leaves nothing running either. They run in sessions of their own: a
terminal's Ctrl-C reaches the program that started them, which stops them in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def dies_with_parent(args: list[str]) -> list[str]:
    """`args` run so that the kernel SIGKILLs them when the thread that started them ends.
    That is the thread, not the process: only the main thread may start them, else they
    would die with a worker thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start the local cluster's processes from the main thread")
    return ["setpriv", "--pdeathsig", "KILL", "--", *args]


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(path: str | Path) -> Iterator[None]:
    """Run the body in the network namespace `path` (this thread only): sockets created
    there stay in that namespace for their whole life, wherever they are used later."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(str(path), os.O_RDONLY)
    try:
        setns(target, CLONE_NEWNET)
        try:
            yield
        finally:
            setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def enter(pid: int, *, net: bool = True, mount: bool = False, pid_ns: bool = False) -> list[str]:
    """The `nsenter` prefix that runs a command in the namespaces of process `pid` (a
    node's holder: its network and mount namespaces, and the PID namespace it made for
    its children)."""
    args = ["nsenter"]
    if net:
        args.append(f"--net=/proc/{pid}/ns/net")
    if mount:
        args.append(f"--mount=/proc/{pid}/ns/mnt")
    if pid_ns:
        args.append(f"--pid=/proc/{pid}/ns/pid_for_children")
    return [*args, "--"]


def run(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A short command; its error output becomes the exception's message."""
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A long-running process that dies with this one, its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            dies_with_parent(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; by the PID we started."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

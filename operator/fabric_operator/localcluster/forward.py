"""A TCP forwarder between network namespaces: it listens in one and connects in another.

Nodes reach the API server this way: it listens on 127.0.0.1 of the host, and each node's
kubelet, kube-proxy and pods connect to the node's own forwarder (node IP or 127.0.0.1
inside the node's namespace), which connects to the host's 127.0.0.1. So no node ever
sends a packet to an address of the host, and the API server never listens beyond
loopback. One fixed destination per forwarder: it is not a proxy anyone can steer.

    python -m fabric_operator.localcluster.forward --listen-netns /proc/PID/ns/net \\
        --listen 0.0.0.0:6443 --connect 127.0.0.1:6443

Prints `listening` on stdout once the listening socket exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys

from fabric_operator.localcluster.nsutil import in_netns


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _socket(netns: str | None) -> socket.socket:
    """A TCP socket of namespace `netns` (None: this process's own)."""
    with in_netns(netns) if netns else contextlib.nullcontext():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    return s


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def serve(
    listen: tuple[str, int], listen_netns: str | None, target: tuple[str, int], netns: str | None
) -> None:
    loop = asyncio.get_running_loop()
    server_sock = _socket(listen_netns)
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server_sock.bind(listen)
    server_sock.listen(128)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = _socket(netns)
        try:
            await loop.sock_connect(upstream, target)
        except OSError:
            upstream.close()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    server = await asyncio.start_server(handle, sock=server_sock)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    p.add_argument("--listen-netns", help="network namespace file to listen in")
    p.add_argument("--connect", required=True, help="HOST:PORT to connect to")
    p.add_argument("--connect-netns", help="network namespace file to connect from")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                _address(args.listen),
                args.listen_netns,
                _address(args.connect),
                args.connect_netns,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""An idle crowd for bench/connections.sh: COUNT keep-alive connections that
each make one request, read the whole answer, and then sit idle.

Connections come from several loopback source addresses (127.0.0.2, ...)
so that one address's ephemeral ports do not cap the crowd. The script
writes `open N` to READY_FILE once every connection has had its answer, then
holds them until STOP_FILE appears, then writes `held M of N` to READY_FILE,
M being the connections the server has not closed, and exits. Any
connection that fails to open or to get a 2xx answer fails the whole crowd
(exit 1), since a partial crowd would make the memory figure a lie.

Standard library only: the bench must not depend on a package index.
"""

import argparse
import asyncio
import os
import socket
import sys

# Linux: pick the source port at connect time, from the whole 4-tuple, not
# at bind time from the source address alone (which would cap each source
# address at one ephemeral range shared by every destination).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Reads one HTTP/1.1 answer with a Content-Length body; returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def open_one(host, port, source, path, opening):
    async with opening:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(read_answer(reader), timeout=30)
        if not 200 <= status < 300:
            raise RuntimeError(f"answer {status} from {source}")
        return reader, writer


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server has closed the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout=0.5) == b""
    except asyncio.TimeoutError:
        return False
    except OSError:
        return True


async def main(args) -> int:
    sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]
    opening = asyncio.Semaphore(args.concurrency)
    tasks = [
        open_one(args.host, args.port, sources[i % len(sources)], args.path, opening)
        for i in range(args.count)
    ]
    try:
        connections = await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.open_timeout)
    except Exception as error:  # noqa: BLE001: any failure fails the crowd
        print(f"idle_crowd: opening {args.count} connections failed: {error!r}", file=sys.stderr)
        return 1
    write_atomically(args.ready_file, f"open {len(connections)}\n")

    # Hold them, idle, until told to stop (bounded: a crowd never outlives
    # its bench).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.hold_timeout
    while not os.path.exists(args.stop_file):
        if loop.time() > deadline:
            print("idle_crowd: no stop file before --hold-timeout", file=sys.stderr)
            return 1
        await asyncio.sleep(0.2)

    closed = await asyncio.gather(*(closed_by_server(reader) for reader, _ in connections))
    held = len(connections) - sum(closed)
    for _, writer in connections:
        writer.close()
    write_atomically(args.ready_file, f"held {held} of {len(connections)}\n")
    return 0


def write_atomically(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/1k.bin")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--sources", type=int, default=8, help="source addresses 127.0.0.2 onwards")
    parser.add_argument("--concurrency", type=int, default=256, help="connections being opened at once")
    parser.add_argument("--open-timeout", type=float, default=300)
    parser.add_argument("--hold-timeout", type=float, default=3600)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--stop-file", required=True)
    sys.exit(asyncio.run(main(parser.parse_args())))

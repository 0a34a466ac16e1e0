"""Measured traffic for the datapath benchmark: a paced sender and a timestamping receiver.

Run as `python -m tensorguard.netguard.bench.traffic send|recv ...` inside a namespace. Every
message carries its sequence number and the sender's CLOCK_MONOTONIC time; both namespaces share
that clock, so the receiver measures one-way latency directly. Each side prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct("!QQ")  # sequence number, send time (ns, CLOCK_MONOTONIC)
MAX_MESSAGE = 65000


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def send(proto: str, dst: str, port: int, count: int, *, rate: float, size: int,
         wait_for_go: bool = False) -> dict[str, Any]:
    """Send ``count`` messages of ``size`` bytes at ``rate`` per second (0: as fast as possible)."""
    size = max(size, HEADER.size)
    padding = b"\0" * (size - HEADER.size)
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    if proto == "tcp":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((dst, port))
    if wait_for_go:  # the benchmark starts its CPU accounting, then says go
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
    interval_ns = int(1e9 / rate) if rate > 0 else 0
    errors = 0
    start = time.monotonic_ns()
    due = start
    for seq in range(count):
        if interval_ns:
            due += interval_ns
            ahead = due - time.monotonic_ns()
            if ahead > 500_000:  # sleep most of a long wait: a spinning sender would steal a core
                time.sleep((ahead - 300_000) / 1e9)
            while time.monotonic_ns() < due:
                pass
        frame = HEADER.pack(seq, time.monotonic_ns()) + padding
        try:
            if proto == "tcp":
                sock.sendall(struct.pack("!I", len(frame)) + frame)
            else:
                sock.send(frame)
        except OSError:  # ENOBUFS and the like: counted as lost at the sender
            errors += 1
    end = time.monotonic_ns()
    sock.close()
    return {"sent": count - errors, "send_errors": errors, "start_ns": start, "end_ns": end}


def receive(proto: str, bind: str, port: int, count: int, timeout: float) -> dict[str, Any]:
    """Receive until ``count`` messages arrived or ``timeout`` s passed without one."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    latencies: list[int] = []
    seen: set[int] = set()
    first = last = 0
    duplicates = 0
    if proto == "tcp":
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((bind, port))
        server.listen(1)
        print(json.dumps({"ready": True}), flush=True)
        server.settimeout(timeout)
        sock, _ = server.accept()
        server.close()
    else:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, 32 * 1024 * 1024)  # SO_RCVBUFFORCE (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
        sock.bind((bind, port))
        print(json.dumps({"ready": True}), flush=True)
    sock.settimeout(timeout)
    buffer = b""
    try:
        while len(seen) < count:
            if proto == "tcp":
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                now = time.monotonic_ns()
                buffer += chunk
                frames = []
                while len(buffer) >= 4:
                    (length,) = struct.unpack_from("!I", buffer)
                    if len(buffer) < 4 + length:
                        break
                    frames.append(buffer[4:4 + length])
                    buffer = buffer[4 + length:]
            else:
                frames = [sock.recv(MAX_MESSAGE)]
                now = time.monotonic_ns()
            for frame in frames:
                seq, sent = HEADER.unpack_from(frame)
                if seq in seen:
                    duplicates += 1
                    continue
                seen.add(seq)
                latencies.append(now - sent)
                first = first or now
                last = now
    except TimeoutError:
        pass
    sock.close()
    ordered = sorted(lat / 1e6 for lat in latencies)
    return {
        "received": len(seen), "duplicates": duplicates, "first_ns": first, "last_ns": last,
        "latency_ms": {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
                       "max": ordered[-1] if ordered else float("nan")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorguard.netguard.bench.traffic")
    sub = parser.add_subparsers(dest="role", required=True)
    tx = sub.add_parser("send")
    tx.add_argument("--dst", required=True)
    rx = sub.add_parser("recv")
    rx.add_argument("--bind", required=True)
    rx.add_argument("--timeout", type=float, default=2.0)
    for p in (tx, rx):
        p.add_argument("--proto", choices=["udp", "tcp"], default="udp")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--count", type=int, required=True)
    tx.add_argument("--rate", type=float, default=0.0)
    tx.add_argument("--size", type=int, default=200)
    tx.add_argument("--wait-for-go", action="store_true",
                    help="connect, print ready, then wait for a line on stdin")
    args = parser.parse_args(argv)
    if args.role == "send":
        result = send(args.proto, args.dst, args.port, args.count, rate=args.rate, size=args.size,
                      wait_for_go=args.wait_for_go)
    else:
        result = receive(args.proto, args.bind, args.port, args.count, args.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

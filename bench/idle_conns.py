#!/usr/bin/env python3
"""Measure a server's resident memory while many idle keep-alive connections are open.

Opens N (default 1,000) HTTP/1.1 keep-alive connections to 127.0.0.1:PORT, sends one
`GET /health` on each and reads the answer, keeps them all open and idle for a moment,
then reads VmRSS from /proc/PID/status for the given process(es), prints it and closes
every connection.

    python3 bench/idle_conns.py --port 18083 --pid 1234
    python3 bench/idle_conns.py --port 18081 --pid <nginx master> --with-children
    python3 bench/idle_conns.py --connections 0 --pid 1234     # just read the RSS

The last line printed is machine-readable for bench/run.sh:
    RSS_RESULT rss_kb=<sum> open=<still open> connections=<asked> ok=<2xx answers>

Standard library only. Traffic goes to 127.0.0.1 only.
"""

import argparse
import os
import resource
import select
import socket
import sys
import time

HOST = "127.0.0.1"


def children_of(pid):
    """Direct children of pid (e.g. the nginx workers under the master)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces, so
        # split after its closing parenthesis.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def status_kb(pid, field="VmRSS"):
    """A memory field of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def read_response(sock, deadline):
    """Read one small HTTP/1.1 response (Content-Length or chunked); return its status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError("timed out reading response headers")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            # /health answers are tiny; read until the terminating chunk.
            while not body.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed in a chunked body")
                body += chunk
            return status
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the body")
        body += chunk
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, help="port on 127.0.0.1 to connect to")
    ap.add_argument("--pid", type=int, action="append", required=True,
                    help="process whose VmRSS is read (repeatable; values are summed)")
    ap.add_argument("--field", default="VmRSS",
                    help="/proc/PID/status field to read (VmRSS; VmHWM for the peak)")
    ap.add_argument("--with-children", action="store_true",
                    help="also sum the direct children of each --pid (nginx workers)")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--path", default="/health")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to keep the connections idle before reading the RSS")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="overall limit in seconds for opening the connections")
    args = ap.parse_args()
    if args.connections and not args.port:
        ap.error("--port is required unless --connections 0")

    # 1,000 sockets plus stdio: lift the soft descriptor limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    request = (f"GET {args.path} HTTP/1.1\r\nHost: {HOST}:{args.port}\r\n"
               "Connection: keep-alive\r\n\r\n").encode()
    socks, ok, failed = [], 0, 0
    deadline = time.monotonic() + args.timeout
    try:
        for _ in range(args.connections):
            if time.monotonic() > deadline:
                print("idle_conns: time limit reached while opening connections", file=sys.stderr)
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5.0)
            try:
                s.connect((HOST, args.port))
                s.sendall(request)
                status = read_response(s, deadline)
            except (OSError, ValueError, IndexError) as e:
                failed += 1
                if failed <= 3:
                    print(f"idle_conns: connection {len(socks) + failed}: {e}", file=sys.stderr)
                s.close()
                continue
            socks.append(s)
            if 200 <= status < 300:
                ok += 1

        time.sleep(args.settle)

        # A connection the server closed meanwhile reads as "readable" (EOF).
        still_open = len(socks)
        for i in range(0, len(socks), 256):
            batch = socks[i:i + 256]
            readable, _, _ = select.select(batch, [], [], 0)
            still_open -= len(readable)

        pids = list(args.pid)
        if args.with_children:
            for pid in args.pid:
                pids.extend(children_of(pid))
        per_pid = {pid: status_kb(pid, args.field) for pid in pids}
    finally:
        for s in socks:
            s.close()

    total = sum(per_pid.values())
    detail = " ".join(f"{pid}:{kb}kB" for pid, kb in per_pid.items())
    print(f"idle_conns: {still_open}/{args.connections} connections open, {ok} answered 2xx, "
          f"{failed} failed; {args.field} {total} kB ({total / 1024:.1f} MiB) [{detail}]")
    print(f"RSS_RESULT rss_kb={total} open={still_open} connections={args.connections} ok={ok}")


if __name__ == "__main__":
    main()

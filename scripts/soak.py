#!/usr/bin/env python3
"""Soak a real `tofy serve` with a hostile mix, loopback only, bounded in time.

Starts `tofy serve 127.0.0.1:0` on a GGUF, then runs --concurrency clients until
--requests requests were sent or --seconds passed, whichever comes first:

- 60% valid chats (half streamed), short max_tokens;
- 20% malformed: bad JSON, wrong types, huge numbers, empty or unknown roles,
  invalid UTF-8, deep nesting, NaN, oversized bodies, too many stops, a NUL
  byte, prompts over the context (by bytes, and by tokens);
- 20% clients that vanish: right after sending, or after the first SSE event;

plus --half-open slow connections that dribble a request header byte by byte
the whole time (reopened whenever the server closes them).

It reports crashes, 5xx on valid requests, malformed requests that did not get
a 4xx with an OpenAI error body, the active and queued sequences at the end
(from /metrics), RSS at start, middle, peak and end, and the p50/p99 latency of
valid requests; and exits 1 when any of these fails:

  the server is alive; 0 valid requests failed (5xx or otherwise); every
  malformed request got a 4xx with an error body; 0 active and 0 queued at
  the end; RSS at the end at most 5% above RSS at the middle.

Standard library only: one asyncio client sends the valid and the hostile
requests alike, over raw sockets, so that it can send what no HTTP library
would (invalid UTF-8, lying Content-Length, half a header). `oha`, the load
tool the issue suggests, is a 5-minute compile on CI's two cores and sends
only well-formed requests.

Usage: scripts/soak.py --tofy target/release/tofy --model models/X.gguf
       [--requests 10000] [--seconds 600] [--concurrency 32] [--half-open 64]
       [--parallel 4] [--ctx 512] [--threads 2] [--seed 0] [--cond-mode MODE]
       [--json FILE|-]
"""

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time

MALFORMED_KINDS = [
    "bad_json",
    "wrong_type",
    "huge_number",
    "empty_role",
    "unknown_role",
    "invalid_utf8",
    "deep_nesting",
    "nan",
    "oversized",
    "too_many_stops",
    "nul_byte",
    "over_context_bytes",
    "over_context_tokens",
    "empty_messages",
]

WORDS = (
    "the a river stone cloud lamp quiet bright seven garden window music "
    "paper green slow early question answer coffee morning city road"
).split()


def chat_body(rng, stream, max_tokens=8):
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    return {
        "model": "tofy",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": rng.choice([0, 0.7]),
        "stream": stream,
    }


def malformed_body(kind):
    """(body bytes, extra headers) for one malformed kind."""
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    dump = lambda v: json.dumps(v).encode()
    if kind == "bad_json":
        return b'{"messages": [{"role": "user", "content": "hi"', {}
    if kind == "wrong_type":
        return dump({"messages": "hi", "max_tokens": "four"}), {}
    if kind == "huge_number":
        return b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', {}
    if kind == "empty_role":
        return dump({"messages": [{"role": "", "content": "hi"}]}), {}
    if kind == "unknown_role":
        return dump({"messages": [{"role": "wizard", "content": "hi"}]}), {}
    if kind == "invalid_utf8":
        return b'{"messages": [{"role": "user", "content": "caf\xc3\x28 \xff\xfe"}]}', {}
    if kind == "deep_nesting":
        return b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}
    if kind == "nan":
        return b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}
    if kind == "oversized":
        # Claims 17 MiB, sends a few bytes: refused on the header alone.
        return b'{"messages": [', {"Content-Length": str(17 << 20)}
    if kind == "too_many_stops":
        return dump({**ok, "stop": ["a", "b", "c", "d", "e"]}), {}
    if kind == "nul_byte":
        return dump({**ok, "messages": [{"role": "user", "content": "a\u0000b"}]}), {}
    if kind == "over_context_bytes":
        return dump({**ok, "messages": [{"role": "user", "content": "x" * 400_000}]}), {}
    if kind == "over_context_tokens":
        words = " ".join(WORDS) + " "
        return dump({**ok, "messages": [{"role": "user", "content": words * 40}]}), {}
    if kind == "empty_messages":
        return dump({"messages": []}), {}
    raise ValueError(kind)


def request_bytes(host, path, body, headers=None):
    head = {
        "Host": host,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    head.update(headers or {})
    lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader):
    """(status, headers, body) of one HTTP/1.1 response."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a status line")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = await reader.read()
    return status, headers, body


def is_error_body(body):
    try:
        error = json.loads(body)["error"]
        return isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


class Soak:
    def __init__(self, args, host):
        self.args = args
        self.host = host
        self.address = host.split(":")
        self.rng = random.Random(args.seed)
        self.sent = 0
        self.deadline = time.monotonic() + args.seconds
        self.latencies = []
        self.valid = {"count": 0, "ok": 0, "status_5xx": 0, "failures": []}
        self.malformed = {"count": 0, "ok": 0, "failures": [], "by_kind": {}}
        self.vanished = 0
        self.half_open = {"connections": 0, "reopened": 0}
        self.stop = False

    def more(self):
        if self.stop or self.sent >= self.args.requests or time.monotonic() >= self.deadline:
            return False
        self.sent += 1
        return True

    async def connect(self):
        return await asyncio.open_connection(self.address[0], int(self.address[1]))

    async def client(self, rng):
        while self.more():
            roll = rng.random()
            # A soak records every failure, whatever it is.
            if roll < 0.6:
                try:
                    await self.valid_request(rng, stream=roll < 0.3)
                except Exception as e:  # noqa: BLE001
                    self.valid["failures"].append(f"client error: {e!r}")
            elif roll < 0.8:
                try:
                    await self.malformed_request(rng)
                except Exception as e:  # noqa: BLE001
                    self.malformed["failures"].append(f"client error: {e!r}")
            else:
                try:
                    await self.vanishing_request(rng, mid_stream=roll < 0.9)
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    pass  # leaving is what these clients do

    async def valid_request(self, rng, stream):
        self.valid["count"] += 1
        body = json.dumps(chat_body(rng, stream)).encode()
        start = time.monotonic()
        reader, writer = await self.connect()
        try:
            writer.write(request_bytes(self.host, "/v1/chat/completions", body))
            await writer.drain()
            status, _, reply = await asyncio.wait_for(read_response(reader), 300)
        finally:
            writer.close()
        if status >= 500:
            self.valid["status_5xx"] += 1
        problem = None
        if status != 200:
            problem = f"status {status}: {reply[:200]!r}"
        elif stream:
            events = [l[6:] for l in reply.decode().split("\n") if l.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                problem = f"stream without [DONE]: {reply[-200:]!r}"
            elif any('"error"' in e for e in events):
                problem = f"error event: {reply[-300:]!r}"
        else:
            message = json.loads(reply)["choices"][0]["message"]
            if message.get("role") != "assistant":
                problem = f"no assistant message: {reply[:200]!r}"
        if problem:
            self.valid["failures"].append(problem)
        else:
            self.valid["ok"] += 1
            self.latencies.append(time.monotonic() - start)

    async def malformed_request(self, rng):
        kind = rng.choice(MALFORMED_KINDS)
        self.malformed["count"] += 1
        self.malformed["by_kind"][kind] = self.malformed["by_kind"].get(kind, 0) + 1
        body, headers = malformed_body(kind)
        reader, writer = await self.connect()
        try:
            writer.write(request_bytes(self.host, "/v1/chat/completions", body, headers))
            await writer.drain()
            status, _, reply = await asyncio.wait_for(read_response(reader), 120)
        finally:
            writer.close()
        if 400 <= status < 500 and is_error_body(reply):
            self.malformed["ok"] += 1
        else:
            self.malformed["failures"].append(f"{kind}: status {status}: {reply[:200]!r}")

    async def vanishing_request(self, rng, mid_stream):
        self.vanished += 1
        body = json.dumps(chat_body(rng, stream=True, max_tokens=64)).encode()
        reader, writer = await self.connect()
        writer.write(request_bytes(self.host, "/v1/chat/completions", body))
        await writer.drain()
        if mid_stream:
            # Up to the first event, then gone.
            while True:
                line = await asyncio.wait_for(reader.readline(), 300)
                if not line or line.startswith(b"data: "):
                    break
        writer.transport.abort()

    async def half_open_connection(self):
        """Dribbles a header a byte every second; reopens when closed."""
        first = True
        while not self.stop:
            try:
                reader, writer = await self.connect()
            except OSError:
                await asyncio.sleep(0.5)
                continue
            self.half_open["connections" if first else "reopened"] += 1
            first = False
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nX-Slow: "
            try:
                writer.write(head.encode())
                while not self.stop:
                    await asyncio.sleep(1)
                    writer.write(b"a")
                    await writer.drain()
                    if reader.at_eof():
                        break
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

    async def run(self):
        slow = [asyncio.create_task(self.half_open_connection()) for _ in range(self.args.half_open)]
        rngs = [random.Random(self.rng.random()) for _ in range(self.args.concurrency)]
        await asyncio.gather(*(self.client(rng) for rng in rngs))
        self.stop = True
        await asyncio.gather(*slow, return_exceptions=True)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def get(host, path):
    import urllib.request

    with urllib.request.urlopen(f"http://{host}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def metric(text, name):
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def start_server(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JEPA_DECODER_", "TOFY_"))}
    env.update(
        JEPA_DECODER_MODEL=args.model,
        JEPA_DECODER_THREADS=str(args.threads),
        JEPA_DECODER_NGL="0",
        RUST_LOG="warn",
    )
    cmd = [args.tofy, "serve", "127.0.0.1:0", "--parallel", str(args.parallel), "--ctx", str(args.ctx)]
    if args.cond_mode:
        cmd += ["--cond-mode", args.cond_mode]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    host = None
    for line in server.stderr:
        m = re.match(r"tofy serve: listening on http://(\S+)", line)
        if m:
            host = m.group(1)
            break
    if host is None:
        sys.exit(f"soak: tofy serve did not start (exit {server.wait()})")
    # Keep draining stderr so the server never blocks on it; keep the tail.
    tail = []

    def drain():
        for line in server.stderr:
            tail.append(line.rstrip())
            del tail[:-50]

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if get(host, "/health")[0] == 200:
                return server, host, tail
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    sys.exit("soak: the server did not become ready in 120 s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tofy", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--half-open", type=int, default=64)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cond-mode", default=None, help="tofy serve --cond-mode (default: the server's)")
    p.add_argument("--json", default=None, help="write the report here (- for stdout)")
    args = p.parse_args()

    server, host, tail = start_server(args)
    pid = server.pid
    rss = {"start": rss_mib(pid), "peak": rss_mib(pid)}
    samples = []
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            value = rss_mib(pid)
            if value is not None:
                samples.append((time.monotonic(), value))
                rss["peak"] = max(rss["peak"] or 0, value)
            sampling.wait(0.25)

    threading.Thread(target=sample, daemon=True).start()
    soak = Soak(args, host)
    started = time.monotonic()
    asyncio.run(soak.run())
    duration = time.monotonic() - started
    sampling.set()

    # The vanished clients' sequences are freed at the decoder's next step.
    active = queued = None
    settle = time.monotonic() + 30
    while time.monotonic() < settle and server.poll() is None:
        _, text = get(host, "/metrics")
        active, queued = metric(text, "tofy_sequences_active"), metric(text, "tofy_sequences_queued")
        if active == 0 and queued == 0:
            break
        time.sleep(0.2)
    crashed = server.poll() is not None
    rss["end"] = rss_mib(pid)
    mid_time = started + duration / 2
    rss["middle"] = next((v for t, v in samples if t >= mid_time), rss["end"])
    growth = None
    if rss["middle"] and rss["end"]:
        growth = 100 * (rss["end"] - rss["middle"]) / rss["middle"]
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()

    lat = soak.latencies
    report = {
        "requests": soak.sent,
        "seconds": round(duration, 1),
        "concurrency": args.concurrency,
        "parallel": args.parallel,
        "cond_mode": args.cond_mode or "server default",
        "crashed": crashed,
        "valid": {
            "count": soak.valid["count"],
            "ok": soak.valid["ok"],
            "status_5xx": soak.valid["status_5xx"],
            "failures": soak.valid["failures"][:10],
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 0.99), 1) if lat else None,
        },
        "malformed": {
            "count": soak.malformed["count"],
            "ok_4xx_with_error_body": soak.malformed["ok"],
            "failures": soak.malformed["failures"][:10],
            "by_kind": soak.malformed["by_kind"],
        },
        "vanished": soak.vanished,
        "half_open": soak.half_open,
        "end_active": active,
        "end_queued": queued,
        "rss_mib": {k: round(v, 1) if v else v for k, v in rss.items()},
        "rss_growth_second_half_pct": round(growth, 2) if growth is not None else None,
    }
    failures = []
    if crashed:
        failures.append("the server died: " + " | ".join(tail[-5:]))
    if soak.valid["ok"] != soak.valid["count"]:
        failures.append(f"{soak.valid['count'] - soak.valid['ok']} valid requests failed")
    if soak.malformed["ok"] != soak.malformed["count"]:
        failures.append(f"{soak.malformed['count'] - soak.malformed['ok']} malformed requests not a 4xx with an error body")
    if active != 0 or queued != 0:
        failures.append(f"sequences left at the end: {active} active, {queued} queued")
    if growth is None or growth > 5:
        failures.append(f"RSS grew {growth}% over the second half")
    report["pass"] = not failures
    report["failures"] = failures
    text = json.dumps(report, indent=2)
    if args.json == "-":
        print(text)
    else:
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        print(text, file=sys.stderr)
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()

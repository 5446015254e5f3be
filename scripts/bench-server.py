#!/usr/bin/env python3
"""Benchmark client for an OpenAI-compatible server (`tofy serve`, llama-server).

Standard library only. For each concurrency level C, C streams run at once;
each stream sends R streamed POST /v1/chat/completions requests back to back
(temperature 0, ignore_eos, max_tokens N,
stream_options.include_usage), each with its own prompt. Per request it
records the time to the first non-empty delta.content (TTFT), the completion
tokens (from the usage chunk, else the number of content chunks) and the end
time. Per level it reports:

  aggregate tok/s   total completion tokens / wall time of the level (first
                    request sent to last request finished)
  TTFT p50, p99     over all requests of the level (linear interpolation)
  decode tok/s      per stream: sum(tokens - 1) / sum(end - first token) over
                    its requests; the mean over streams

One markdown table row per level goes to stdout (the header too, when --out
is new or empty, or without --out), and one JSON line per level is appended
to --out. Short warm-up requests run first, one per stream, and are not counted.
Exit status 1 when any request failed.

usage: scripts/bench-server.py --base-url http://127.0.0.1:8080 \\
           --concurrency 1,4,8 [--requests-per-stream 2] [--max-tokens 128] \\
           [--label NAME] [--model tofy] [--out FILE.jsonl]
env: TOFY_API_KEY, sent as a bearer token when set.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse

TOPICS = [
    "a lighthouse keeper", "a lost robot", "a dragon who cannot fly",
    "a city under the sea", "a clockmaker's apprentice", "a haunted library",
    "a cat who runs a bakery", "the last tree on Mars", "a time-travelling chef",
    "a shy volcano", "a detective snail", "a kingdom of mirrors",
    "a river that flows uphill", "a pirate afraid of water", "a talking violin",
    "a garden on the moon", "a knight made of snow", "a train to nowhere",
    "a whale that sings opera", "a village of inventors", "a forgotten satellite",
    "a desert made of glass", "a fox who collects maps", "a storm in a teacup",
    "an owl who cannot sleep", "a bridge between two worlds", "a giant's lost button",
    "a wizard's broken wand", "a lonely snowman", "a paper boat's voyage",
    "a bee who hates honey", "a circus of shadows", "a mountain that whispers",
    "a painter who paints the future", "a sleepy dragon", "a treasure map in a bottle",
    "a robot learning to dance", "an island that moves", "a star that fell to earth",
    "a squirrel astronaut",
]


def prompt_for(k):
    """The k-th prompt of a run: distinct for every k."""
    topic = TOPICS[k % len(TOPICS)]
    lap = k // len(TOPICS)
    return f"Write a story about {topic}." if lap == 0 else f"Write a story about {topic}, part {lap + 1}."


def percentile(values, p):
    """Linear-interpolation percentile (numpy's default), p in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Target:
    def __init__(self, base_url, model, api_key):
        u = urllib.parse.urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"bench-server: bad --base-url {base_url!r}")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.path = (u.path or "") + "/v1/chat/completions"
        self.root = u.path or ""
        # --endpoint completions: the same conversation as one raw ChatML text
        # (SmolLM2's template) on /v1/completions, so that both servers
        # evaluate exactly the same tokens (tofy conditions chat requests only).
        self.raw_system = None
        self.model = model
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def connect(self, timeout):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        conn.connect()
        return conn


def iter_sse(resp):
    """Yield the data of each server-sent event of resp (multi-line data joined)."""
    data = []
    while True:
        raw = resp.readline()
        if not raw:
            break
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def run_request(target, prompt, max_tokens, timeout):
    """One streamed chat request on a fresh connection; returns its record.

    A fresh connection per request: llama-server advertises keep-alive but
    closes the connection after a streamed response. The TCP connect happens
    before the clock starts, so TTFT does not include it.
    """
    request = {"messages": [{"role": "user", "content": prompt}]}
    path = target.path
    if target.raw_system is not None:
        path = target.root + "/v1/completions"
        request = {"prompt": f"<|im_start|>system\n{target.raw_system}<|im_end|>\n"
                             f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"}
    body = json.dumps({
        "model": target.model,
        **request,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "ignore_eos": True,
        "max_tokens": max_tokens,
    })
    rec = {"prompt": prompt, "ttft_s": None, "completion_tokens": None,
           "content_chunks": 0, "usage_tokens": None, "error": None}
    conn = None
    t_first = None
    t_send = time.perf_counter()
    try:
        conn = target.connect(timeout)
        t_send = time.perf_counter()
        conn.request("POST", path, body=body, headers=target.headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")[:300]
            raise RuntimeError(f"HTTP {resp.status}: {text}")
        done = False
        for data in iter_sse(resp):
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {data[:300]}")
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content") or choice.get("text")
                if content:
                    rec["content_chunks"] += 1
                    if t_first is None:
                        t_first = time.perf_counter()
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                rec["usage_tokens"] = usage["completion_tokens"]
        if not done:
            raise RuntimeError("stream ended without data: [DONE]")
    except Exception as e:  # noqa: BLE001 - recorded and reported per request
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if conn is not None:
            conn.close()
    t_end = time.perf_counter()
    rec["t_send"] = t_send
    rec["t_first"] = t_first
    rec["t_end"] = t_end
    if t_first is not None:
        rec["ttft_s"] = t_first - t_send
    rec["completion_tokens"] = (rec["usage_tokens"] if rec["usage_tokens"] is not None
                                else rec["content_chunks"])
    if rec["error"] is None and t_first is None:
        rec["error"] = "no content chunk"
    return rec


def run_level(target, concurrency, per_stream, max_tokens, timeout, first_prompt):
    barrier = threading.Barrier(concurrency)
    results = [[] for _ in range(concurrency)]

    def stream(i):
        barrier.wait()
        for j in range(per_stream):
            prompt = prompt_for(first_prompt + i * per_stream + j)
            rec = run_request(target, prompt, max_tokens, timeout)
            rec["stream"] = i
            rec["index"] = j
            results[i].append(rec)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(args, concurrency, results):
    recs = [r for rs in results for r in rs]
    ok = [r for r in recs if r["error"] is None]
    errors = [r["error"] for r in recs if r["error"] is not None]
    sends = [r["t_send"] for r in recs]
    ends = [r["t_end"] for r in recs]
    wall = (max(ends) - min(sends)) if sends else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    ttfts = [r["ttft_s"] for r in ok]
    stream_rates = []
    for rs in results:
        dec_tokens = sum(r["completion_tokens"] - 1 for r in rs if r["error"] is None)
        dec_time = sum(r["t_end"] - r["t_first"] for r in rs if r["error"] is None)
        if dec_time > 0 and dec_tokens > 0:
            stream_rates.append(dec_tokens / dec_time)
    short = sum(1 for r in ok if r["completion_tokens"] < args.max_tokens)
    return {
        "label": args.label,
        "model": args.model,
        "base_url": args.base_url,
        "concurrency": concurrency,
        "requests_per_stream": args.requests_per_stream,
        "max_tokens": args.max_tokens,
        "requests": len(recs),
        "errors": len(errors),
        "error_samples": errors[:3],
        "short_completions": short,
        "completion_tokens": tokens,
        "usage_reported": sum(1 for r in ok if r["usage_tokens"] is not None),
        "wall_s": round(wall, 4),
        "aggregate_tok_s": round(tokens / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 2) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 2) if ttfts else None,
        "decode_tok_s_per_stream": (round(sum(stream_rates) / len(stream_rates), 3)
                                    if stream_rates else None),
        "per_request": [
            {"stream": r["stream"], "index": r["index"],
             "ttft_ms": round(r["ttft_s"] * 1000, 2) if r["ttft_s"] is not None else None,
             "latency_ms": round((r["t_end"] - r["t_send"]) * 1000, 2),
             "completion_tokens": r["completion_tokens"], "error": r["error"]}
            for r in recs
        ],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


HEADER = ("| label | streams | requests | tokens | wall s | aggregate tok/s "
          "| TTFT p50 ms | TTFT p99 ms | decode tok/s per stream |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def row(s):
    err = f" ({s['errors']} failed)" if s["errors"] else ""
    return (f"| {s['label']} | {s['concurrency']} | {s['requests']}{err} | {s['completion_tokens']} "
            f"| {fmt(s['wall_s'], 2)} | {fmt(s['aggregate_tok_s'])} | {fmt(s['ttft_p50_ms'])} "
            f"| {fmt(s['ttft_p99_ms'])} | {fmt(s['decode_tok_s_per_stream'])} |")


def summarize_rounds(path):
    """Medians over the rounds of a bench-server.sh run: each (label, streams) row, then
    tofy / llama-server per streams and mode. Labels read "<server> np=<N> <mode>"."""
    groups = {}
    with open(path) as f:
        for line in f:
            s = json.loads(line)
            groups.setdefault((s["label"], s["concurrency"]), []).append(s)

    def med(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    print("| label | streams | rounds | aggregate tok/s, median (min-max) | TTFT p50 ms | "
          "TTFT p99 ms | decode tok/s per stream |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for (label, c), rows in groups.items():
        tok = [r["aggregate_tok_s"] for r in rows if r["aggregate_tok_s"] is not None] or [None]
        medians[(label, c)] = med(rows, "aggregate_tok_s")
        print(f"| {label} | {c} | {len(rows)} | {fmt(medians[(label, c)])} "
              f"({fmt(min(tok))}-{fmt(max(tok))}) | {fmt(med(rows, 'ttft_p50_ms'))} | "
              f"{fmt(med(rows, 'ttft_p99_ms'))} | {fmt(med(rows, 'decode_tok_s_per_stream'))} |")
    print()
    print("| streams | mode | tofy / llama-server: of the medians | per round, median (min-max) "
          "| TTFT p50, tofy / llama-server |")
    print("|---:|---|---:|---:|---:|")
    for (label, c), ours in medians.items():
        if not label.startswith("tofy "):
            continue
        rest = label[len("tofy "):]
        # llama-server has no conditioning: its plain chat is the peer of
        # every tofy chat mode ("prefix chat" included).
        peer_label = "llama-server " + rest.replace("prefix chat", "chat")
        peer = medians.get((peer_label, c))
        if not (ours and peer):
            continue
        # Rounds are appended in order, so the i-th rows of both ran back to back.
        ratios = [a["aggregate_tok_s"] / b["aggregate_tok_s"]
                  for a, b in zip(groups[(label, c)], groups[(peer_label, c)])
                  if a["aggregate_tok_s"] and b["aggregate_tok_s"]]
        if not ratios:
            continue
        mode = rest.split(" ", 1)[1] if " " in rest else rest
        ttft_ours, ttft_peer = med(groups[(label, c)], "ttft_p50_ms"), med(groups[(peer_label, c)], "ttft_p50_ms")
        ttft = f"{ttft_ours / ttft_peer:.2f}" if ttft_ours and ttft_peer else "-"
        print(f"| {c} | {mode} | {ours / peer:.2f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {ttft} |")
    return 0


def parse_levels(text):
    try:
        levels = [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad concurrency list {text!r}")
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"bad concurrency list {text!r}")
    return levels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("--summarize", metavar="JSONL",
                    help="print the medians over the rounds recorded in JSONL, and exit")
    ap.add_argument("--concurrency", type=parse_levels, default=[1],
                    help="comma list of concurrent streams per level (default 1)")
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--label", default=None, help="row label (default: the base URL)")
    ap.add_argument("--model", default="tofy")
    ap.add_argument("--out", default=None, help="JSON lines file to append to")
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout, seconds")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up requests")
    ap.add_argument("--raw-system", default=None,
                    help="send POST /v1/completions with this system text and the user prompt "
                         "in ChatML, instead of chat requests")
    args = ap.parse_args()
    if args.summarize:
        return summarize_rounds(args.summarize)
    if not args.base_url:
        ap.error("--base-url is required")
    if args.requests_per_stream < 1 or args.max_tokens < 1:
        ap.error("--requests-per-stream and --max-tokens must be >= 1")
    if args.label is None:
        args.label = args.base_url
    target = Target(args.base_url, args.model, os.environ.get("TOFY_API_KEY"))
    target.raw_system = args.raw_system

    if not args.no_warmup:
        # One short request per stream of the largest level, all at once, with prompts the
        # run does not use: every slot has seen this mode's prompt shape (its system message,
        # cacheable), as in a server that has been serving this kind of request.
        warm = run_level(target, max(args.concurrency), 1, 8, args.timeout, 100_000)
        failed = [r["error"] for rs in warm for r in rs if r["error"] is not None]
        if failed:
            print(f"bench-server: warm-up request failed: {failed[0]}", file=sys.stderr)
            return 1

    new_out = args.out is None or not os.path.exists(args.out) or os.path.getsize(args.out) == 0
    if new_out:
        print(HEADER, flush=True)
    failed = False
    next_prompt = 0
    for c in args.concurrency:
        results = run_level(target, c, args.requests_per_stream, args.max_tokens,
                            args.timeout, next_prompt)
        next_prompt += c * args.requests_per_stream
        s = summarize(args, c, results)
        print(row(s), flush=True)
        if s["errors"]:
            failed = True
            print(f"bench-server: {s['errors']} request(s) failed at {c} streams, e.g. "
                  f"{s['error_samples'][0]}", file=sys.stderr)
        if s["short_completions"]:
            print(f"bench-server: {s['short_completions']} request(s) at {c} streams stopped "
                  f"before max_tokens={args.max_tokens} (ignore_eos not honoured?)",
                  file=sys.stderr)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(s) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

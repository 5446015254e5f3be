#!/usr/bin/env python3
"""The loopback cluster check of issue 16 (scripts/cluster-check.sh runs it).

Three `tofy serve` replicas behind nginx running deploy/nginx/tofy.conf as
shipped (only its addresses swapped for loopback ports). Simulated agents
hold multi-turn conversations, each resending its whole history under its
own X-Session-Id; even-numbered agents stream, odd ones do not. In the
middle of the run replica 2 is killed with SIGKILL and restarted; later a
replica with sequences running (3, or 1 when only 1 is busy) is drained
with SIGTERM. Then the same load runs, with no faults,
against 3 replicas and against 1, for aggregate throughput.

Definitions (the report repeats them):
- a request *fails* when it gets no 200 or its stream ends without [DONE];
- a failure is *excused* only when the request was in flight at the kill
  and its replica was, or may have been, replica 2 (its response named r2,
  or it had not yet learned its replica while its session lived on r2);
- a turn (2..5) is a *cache hit* when more than half its prompt tokens came
  from the KV cache (a miss reuses only the few chat-template tokens all
  prompts share, so `cached_tokens > 0` alone is near-meaningless; it is
  reported too);
- a turn is in the *failover window* when a failover event falls after its
  session's previous turn began and before the turn ended (a request nginx
  retried elsewhere after its replica died is inside). The events: the
  kill; the restarted replica's recovery, which is the end of the first
  request it completes (after fail_timeout nginx lets a request through to
  a failed replica, one every fail_timeout, and takes it back fully only
  when one succeeds, so with minute-long CPU turns recovery comes well
  after the restart); and the drain.
- each replica gets --parallel 12 (as many sequences as agents), so that a
  replica can hold every conversation when the others are down: the check
  measures routing, not capacity (deploy/README.md sizes --parallel).

Only the standard library: it runs wherever python3 does.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

FAIL_TIMEOUT = 10.0  # deploy/nginx/tofy.conf's fail_timeout

BRIEF = (
    "You are a careful assistant helping a developer with a small Rust service. "
    "Answer briefly and concretely. The service reads requests from a queue, "
    "checks each one against a schema, writes valid ones to a database and "
    "sends invalid ones back with a clear error that names the field at fault. "
    "It runs as several replicas behind a load balancer, logs one line per "
    "request with its id, and exports counters for requests, errors and "
    "latencies. The team prefers small functions, errors that say what to do, "
    "tests that use real files and real processes, and benchmarks instead of "
    "timed assertions. When you are unsure, say what you would measure to find "
    "out. Keep replies under three sentences unless asked for more. "
)
QUESTIONS = [
    "How should the service report a malformed request?",
    "What should one log line per request contain?",
    "How would you test the database writes without mocks?",
    "Which latency figures would you export, and why?",
    "How do the replicas share work fairly?",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def active_sequences(port):
    try:
        status, text = get(port, "/metrics")
    except OSError:
        return -1
    match = re.search(r"^tofy_sequences_active(?:\{[^}]*\})? (\S+)$", text, re.M)
    return int(float(match.group(1))) if status == 200 and match else -1


class Replica:
    def __init__(self, args, index, port, logdir, threads, parallel):
        self.args, self.index, self.port = args, index, port
        self.name = f"r{index}"
        self.log = open(os.path.join(logdir, f"replica-{index}.log"), "ab")
        self.threads, self.parallel = threads, parallel
        self.proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JEPA_DECODER_", "TOFY_"))}
        env.update(JEPA_DECODER_MODEL=self.args.model, JEPA_DECODER_THREADS=str(self.threads), JEPA_DECODER_NGL="0")
        self.proc = subprocess.Popen(
            [self.args.tofy, "serve", f"127.0.0.1:{self.port}", "--replica-id", self.name,
             "--parallel", str(self.parallel), "--drain-timeout", "120"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, seconds=120):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"cluster-check: replica {self.name} exited ({self.proc.returncode}); see its log")
            try:
                if get(self.port, "/health")[0] == 200:
                    return time.time()
            except OSError:
                pass
            time.sleep(0.05)
        sys.exit(f"cluster-check: replica {self.name} was not ready in {seconds} s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Nginx:
    """nginx running the shipped config with loopback addresses."""

    def __init__(self, conf_path, workdir, ports, port):
        self.dir = os.path.join(workdir, f"nginx-{port}")
        os.makedirs(self.dir, exist_ok=True)
        text = open(conf_path).read()
        for i, p in enumerate(ports, 1):
            text = text.replace(f"10.0.0.{i}:8080", f"127.0.0.1:{p}")
        # Fewer replicas: their upstream lines go (their per-replica
        # locations stay, unused).
        text = re.sub(r"^\s*server 10\.0\.0\.\d+:8080[^\n]*\n", "", text, flags=re.M)
        text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        text = text.replace("/var/log/nginx/tofy.access.log", os.path.join(self.dir, "access.log"))
        open(os.path.join(self.dir, "tofy.conf"), "w").write(text)
        temp = "\n".join(f"    {kind}_temp_path {self.dir}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root root;\n" if os.getuid() == 0 else ""
        open(os.path.join(self.dir, "nginx.conf"), "w").write(
            f"{user}worker_processes 1;\npid {self.dir}/nginx.pid;\n"
            f"error_log {self.dir}/error.log warn;\ndaemon off;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n{temp}\n    include {self.dir}/tofy.conf;\n}}\n")
        self.port = port
        self.proc = subprocess.Popen(["nginx", "-p", self.dir, "-c", f"{self.dir}/nginx.conf"],
                                     stderr=open(os.path.join(self.dir, "stderr.log"), "wb"))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit(f"cluster-check: nginx did not start; see {self.dir}/error.log")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Turn:
    def __init__(self, session, turn, stream):
        self.session, self.turn, self.stream = session, turn, stream
        self.start = self.end = None
        self.ok, self.error = False, ""
        self.replica = None
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0


def chat(port, session, messages, stream, max_tokens, turn):
    body = {"model": "tofy", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    turn.start = time.time()
    reply = ""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", "X-Session-Id": session})
        r = conn.getresponse()
        turn.replica = r.getheader("x-tofy-replica")
        if r.status != 200:
            turn.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return None
        if not stream:
            value = json.loads(r.read())
            reply = value["choices"][0]["message"]["content"] or ""
            usage = value["usage"]
        else:
            usage, done = None, False
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    reply += choice.get("delta", {}).get("content") or ""
            if not done:
                turn.error = "stream ended without [DONE]"
                return None
        turn.prompt_tokens = usage["prompt_tokens"]
        turn.cached_tokens = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        turn.completion_tokens = usage["completion_tokens"]
        turn.ok = True
        return reply
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        turn.error = f"{type(e).__name__}: {e}"
        return None
    finally:
        turn.end = time.time()
        conn.close()


def run_agents(port, tag, agents, turns, max_tokens, progress=None):
    """Every agent's conversation, concurrently; every turn's record."""
    records, lock = [], threading.Lock()

    def agent(i):
        session = f"{tag}-agent-{i:02d}"
        # The session id first, so conversations share no prompt prefix
        # beyond the chat template's own tokens.
        history = [{"role": "system", "content": f"[{session}] {BRIEF * 3}"}]
        for t in range(turns):
            history.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            turn = Turn(session, t + 1, stream=(i % 2 == 0))
            reply = chat(port, session, history, turn.stream, max_tokens, turn)
            with lock:
                records.append(turn)
            if progress:
                progress()
            # A failed turn is retried as the next turn with the same
            # history, as a client would; the conversation goes on.
            if reply is None:
                history.pop()
                continue
            history.append({"role": "assistant", "content": reply})

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    started = time.time()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return records, time.time() - started


def sessions(records):
    """Each session's turns, in the order they began."""
    by_session = {}
    for r in sorted(records, key=lambda r: r.start):
        by_session.setdefault(r.session, []).append(r)
    return by_session


def later_turns(records, moments=()):
    """Turns 2.. that succeeded, split into (outside, inside) the failover
    window: inside when a moment falls after the session's previous turn
    began and before this one ended (a request retried elsewhere after its
    replica died is inside)."""
    outside, inside = [], []
    for turns in sessions(records).values():
        for prev, cur in zip(turns, turns[1:]):
            if cur.ok:
                hit = any(prev.start < m <= cur.end for m in moments)
                (inside if hit else outside).append(cur)
    return outside, inside


def half_cached(r):
    return r.cached_tokens * 2 > r.prompt_tokens


def any_cached(r):
    return r.cached_tokens > 0


def share(turns, hit):
    hits = sum(map(hit, turns))
    return {"turns": len(turns), "hits": hits,
            "share": round(hits / len(turns), 3) if turns else None}


def retried(lb):
    """How often nginx retried a request on another replica, by the
    statuses it got (`upstream_status` of its access log: "503, 200" is a
    503 from a draining replica, then a 200 elsewhere; nginx logs a refused
    or cut connection as 502)."""
    counts = {}
    for line in open(os.path.join(lb.dir, "access.log")):
        match = re.search(r"upstream_status=([0-9, ]+)$", line.strip())
        if match and "," in match.group(1):
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def throughput(records, wall):
    done = [r for r in records if r.ok]
    completion = sum(r.completion_tokens for r in done)
    evaluated = sum(r.prompt_tokens - r.cached_tokens for r in done)
    return {"requests": len(records), "ok": len(done), "wall_s": round(wall, 1),
            "completion_tokens": completion, "completion_tok_s": round(completion / wall, 2),
            "prompt_tokens_evaluated": evaluated,
            "prompt_tok_s": round(evaluated / wall, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tofy", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--conf", default="deploy/nginx/tofy.conf")
    ap.add_argument("--agents", type=int, default=12)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--parallel", type=int, default=12,
                    help="--parallel of each replica (default: as many as agents)")
    ap.add_argument("--json", default="target/cluster-check.json")
    args = ap.parse_args()
    if not shutil.which("nginx"):
        sys.exit("cluster-check: nginx not found; run scripts/setup.sh --cluster")
    work = tempfile.mkdtemp(prefix="tofy-cluster-")
    print(f"cluster-check: logs in {work}", flush=True)
    ports = [free_port() for _ in range(3)]
    replicas = [Replica(args, i + 1, p, work, threads=1, parallel=args.parallel) for i, p in enumerate(ports)]
    nginxes = []

    def up(group):
        """Starts `group`'s replicas and puts a fresh nginx before them."""
        for r in group:
            r.start()
        for r in group:
            r.wait_ready()
        lb = Nginx(args.conf, work, [r.port for r in group], free_port())
        nginxes.append(lb)
        return lb

    def down(lb, group):
        lb.stop()
        nginxes.remove(lb)
        for r in group:
            r.stop()

    try:
        lb = up(replicas)
        total = args.agents * args.turns
        report = {"machine": os.uname().nodename, "cpus": os.cpu_count(),
                  "date": time.strftime("%Y-%m-%d"), "agents": args.agents,
                  "turns": args.turns, "max_tokens": args.max_tokens}

        # --- Phase 1: faults ------------------------------------------------
        events, finished = {}, [0]
        cond = threading.Condition()

        def progress():
            with cond:
                finished[0] += 1
                cond.notify_all()

        def faults():
            with cond:
                cond.wait_for(lambda: finished[0] >= total // 3)
            r2 = replicas[1]
            events["kill"] = time.time()
            r2.proc.send_signal(signal.SIGKILL)
            r2.proc.wait()
            print(f"cluster-check: killed r2 (SIGKILL) after {finished[0]}/{total} requests", flush=True)
            r2.start()
            events["r2_ready"] = r2.wait_ready()
            print(f"cluster-check: r2 restarted, ready after {events['r2_ready'] - events['kill']:.1f} s", flush=True)
            with cond:
                cond.wait_for(lambda: finished[0] >= total // 2)
            # Drain a replica with work in flight, or the drain proves
            # nothing: r3, or r1 when only r1 is busy (which sessions land
            # where depends on the ports, new each run). Give up waiting
            # after a minute and drain r3 anyway.
            deadline = time.time() + 60
            while True:
                busy = {r.name: active_sequences(r.port) for r in (replicas[2], replicas[0])}
                if max(busy.values()) >= 1 or time.time() >= deadline:
                    break
                time.sleep(0.05)
            drained = replicas[2] if busy["r3"] >= busy["r1"] else replicas[0]
            events["drained_replica"] = drained.name
            events["drain_active"] = busy[drained.name]
            events["drain"] = time.time()
            drained.proc.send_signal(signal.SIGTERM)
            code = drained.proc.wait()
            events["drain_exit"] = time.time()
            events["drain_code"] = code
            print(f"cluster-check: drained {drained.name} (SIGTERM) with {events['drain_active']} "
                  f"sequences active, after {finished[0]}/{total} requests: exit {code} in "
                  f"{events['drain_exit'] - events['drain']:.1f} s", flush=True)

        fault_thread = threading.Thread(target=faults)
        fault_thread.start()
        records, wall = run_agents(lb.port, "faults", args.agents, args.turns, args.max_tokens, progress)
        fault_thread.join()

        kill = events["kill"]
        by_session = sessions(records)
        failed = [r for r in records if not r.ok]
        excused, unexcused = [], []
        for r in failed:
            in_flight = r.start <= kill <= r.end
            earlier = [p for p in by_session[r.session] if p.start < r.start and p.replica]
            last_replica = earlier[-1].replica if earlier else None
            on_r2 = r.replica == "r2" or (r.replica is None and last_replica in ("r2", None))
            (excused if in_flight and on_r2 else unexcused).append(r)
        lost_by_drain = [r for r in unexcused
                         if r.end >= events["drain"] and r.start <= events["drain_exit"]]
        on_drained = [r for r in records if r.start <= events["drain"] <= r.end
                      and r.replica == events["drained_replica"]]

        served = [r.end for r in records
                  if r.ok and r.replica == "r2" and r.start >= events["r2_ready"]]
        events["r2_recovered"] = min(served, default=events["r2_ready"] + FAIL_TIMEOUT)
        moments = [events["kill"], events["r2_recovered"], events["drain"]]
        outside, window = later_turns(records, moments)
        report["faults"] = {
            **throughput(records, wall),
            "failed": len(failed),
            "failed_in_flight_on_killed_replica": len(excused),
            "failed_otherwise": len(unexcused),
            "lost_by_drain": len(lost_by_drain),
            "drain_exit_code": events["drain_code"],
            "drained_replica": events["drained_replica"],
            "drain_sequences_active": events["drain_active"],
            "in_flight_on_drained_replica": len(on_drained),
            "finished_on_drained_replica": sum(r.ok for r in on_drained),
            "drain_seconds": round(events["drain_exit"] - events["drain"], 2),
            "r2_restart_seconds": round(events["r2_ready"] - events["kill"], 2),
            "r2_recovered_seconds": round(events["r2_recovered"] - events["kill"], 2),
            "cache_hit_outside_failover": share(outside, half_cached),
            "cache_hit_in_failover_window": share(window, half_cached),
            "cache_hit_all_later_turns": share(outside + window, half_cached),
            "cached_tokens_gt_0_outside_failover": share(outside, any_cached),
            "failures": [{"session": r.session, "turn": r.turn, "stream": r.stream,
                          "replica": r.replica, "error": r.error[:160]} for r in failed],
        }
        report["faults"]["nginx_retried"] = retried(lb)
        print(json.dumps(report["faults"], indent=1), flush=True)
        t0 = min(r.start for r in records)
        report["faults"]["events_s"] = {k: round(v - t0, 2) for k, v in events.items()
                                        if isinstance(v, float)}
        report["faults"]["turns"] = [
            {"session": r.session, "turn": r.turn, "stream": r.stream, "ok": r.ok,
             "start_s": round(r.start - t0, 2), "end_s": round(r.end - t0, 2),
             "replica": r.replica, "prompt": r.prompt_tokens, "cached": r.cached_tokens}
            for r in sorted(records, key=lambda r: (r.session, r.turn))]

        # --- Phase 2: throughput, 3 replicas vs 1, no faults -----------------
        # Every replica restarted, so both runs start with empty caches, and
        # a fresh nginx: the first one still counts phase 1's failures
        # against r2 and the drained replica, and would move sessions when
        # it took them back.
        down(lb, replicas)
        lb = up(replicas)
        records, wall = run_agents(lb.port, "three", args.agents, args.turns, args.max_tokens)
        report["three_replicas"] = {**throughput(records, wall), "threads_each": 1,
                                    "cache_hit": share(later_turns(records)[0], half_cached)}
        print("cluster-check: 3 replicas:", report["three_replicas"], flush=True)
        down(lb, replicas)

        single = Replica(args, 1, ports[0], work, threads=2, parallel=args.parallel)
        replicas.append(single)
        lb = up([single])
        records, wall = run_agents(lb.port, "one", args.agents, args.turns, args.max_tokens)
        report["one_replica"] = {**throughput(records, wall), "threads": 2,
                                 "cache_hit": share(later_turns(records)[0], half_cached)}
        print("cluster-check: 1 replica: ", report["one_replica"], flush=True)
    finally:
        for n in nginxes:
            n.stop()
        for r in replicas:
            r.stop()

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    f = report["faults"]
    outside, calm = f["cache_hit_outside_failover"], report["three_replicas"]["cache_hit"]
    checks = [
        ("every request not in flight on the killed replica succeeded", f["failed_otherwise"] == 0),
        ("the drain lost no request and exited 0", f["lost_by_drain"] == 0 and f["drain_exit_code"] == 0),
        (f"cache hits on >= 90% of turns 2-5 outside the failover window "
         f"({outside['hits']}/{outside['turns']})",
         outside["share"] is not None and outside["share"] >= 0.9),
        (f"cache hits on >= 90% of turns 2-5 with no faults ({calm['hits']}/{calm['turns']})",
         calm["share"] is not None and calm["share"] >= 0.9),
    ]
    print(f"cluster-check: report in {args.json}")
    for what, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()

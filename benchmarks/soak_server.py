"""Soak test of `gemma4 serve` (issue 20): many clients, careless and hostile, for minutes, on loopback.

    python benchmarks/soak_server.py                        # 10 minutes, 48 clients, the built-in tiny model
    python benchmarks/soak_server.py --minutes 2 --clients 32 --model PATH

Starts the server in its own process, then `--clients` clients loop until the time is up, each picking at
random (seeded) one of: a streamed or a whole chat that must give exactly the text it gave when it ran alone
at the start ("victims"), a completion, a stream dropped after a few chunks, a whole request dropped after
0.3 s, or one of the hostile requests below (each must get its 4xx). Every 30 s it prints the server's RSS and
its K/V in use. At the end: the K/V in use must be back to 0; then, with requests running, SIGTERM, and the
server must exit 0 within its drain timeout. Prints a summary; exits 1 if any check failed: a 5xx, a victim
whose text changed or that failed, K/V left in use, a wrong exit.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

KEY = "soak-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
HOSTILE = [  # (name, raw JSON body or dict, expected status)
    ("tiny temperature", {"temperature": 1e-40}, 400),
    ("huge repetition penalty", {"repetition_penalty": 1e300}, 400),
    ("NaN penalty", '{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": NaN}', 400),
    ("self-referring schema", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}},
     400),
    ("schema that fails while generating", {"max_tokens": 30, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"$ref": "#"}},
                                                          "required": ["a"]}}}}, 400),
    ("seed past 64 bits", {"seed": 2 ** 70}, 400),
    ("seed true", {"seed": True}, 400),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("image placeholder text", {"messages": [{"role": "user", "content": "see <|image|>"}]}, 400),
    ("deep JSON", '{"messages": [{"role": "user", "content": "x"}], "x": ' + "[" * 5000 + "]" * 5000 + "}", 400),
    ("malformed JSON", '{"messages": [', 400),
    ("local file", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                               "image_url": {"url": "/etc/passwd"}}]}]}, 400),
    ("bad token ids", ("/v1/completions", {"prompt": [2, 258880, 3], "max_tokens": 2}), 400),
    ("long text", ("/v1/completions", {"prompt": "hello " * 800_000, "max_tokens": 2}), 400),
    ("wrong key", "wrong key", 401),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def metrics(client, url) -> dict:
    """{metric name: value} of the server's gauges and counters (one model, so one sample each)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(url + "/metrics", headers=HEADERS)).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def victim_body(i: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": f"victim {i}"}], "max_tokens": 24, "temperature": 1.0,
            "seed": 1000 + i, "stream": stream}


async def run_victim(client, url, i: int, stream: bool) -> tuple[int, str, str]:
    """(status, text, finish reason) of one victim request."""
    body = victim_body(i, stream)
    if not stream:
        r = await client.post(url + "/v1/chat/completions", json=body, headers=HEADERS)
        if r.status_code != 200:
            return r.status_code, r.text[:200], "error"
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] or "", choice["finish_reason"]
    text, reason = "", None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=HEADERS) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()[:200], "error"
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return 200, json.dumps(event)[:200], "error"
                for c in event["choices"]:
                    text += c["delta"].get("content") or ""
                    reason = c["finish_reason"] or reason
    return 200, text, reason


async def client_loop(n: int, url: str, deadline: float, expected: dict, stats: collections.Counter, problems: list):
    rng = random.Random(n)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choice(["victim stream", "victim whole", "victim stream", "completion", "drop stream",
                               "drop whole", "hostile"])
            try:
                if kind.startswith("victim"):
                    i, stream = rng.randrange(8), kind.endswith("stream")
                    status, text, reason = await run_victim(client, url, i, stream)
                    stats[f"{kind} {status}"] += 1
                    if (status, text, reason) != expected[(i, stream)]:
                        problems.append(f"victim {i} ({kind}) got {status} {reason} {text[:80]!r}")
                elif kind == "completion":
                    r = await client.post(url + "/v1/completions", headers=HEADERS,
                                          json={"prompt": f"Count to {rng.randrange(100)}", "max_tokens": 16})
                    stats[f"{kind} {r.status_code}"] += 1
                    if r.status_code != 200:
                        problems.append(f"completion got {r.status_code} {r.text[:200]}")
                elif kind == "drop stream":
                    async with client.stream("POST", url + "/v1/chat/completions", headers=HEADERS,
                                             json={"messages": [{"role": "user", "content": "go on"}],
                                                   "max_tokens": 2000, "stream": True}) as r:
                        chunks = 0
                        async for _ in r.aiter_lines():
                            chunks += 1
                            if chunks > rng.randrange(2, 12):
                                break
                    stats[kind] += 1
                elif kind == "drop whole":
                    try:
                        await client.post(url + "/v1/chat/completions", headers=HEADERS, timeout=0.3,
                                          json={"messages": [{"role": "user", "content": "go on"}], "max_tokens": 2000})
                    except httpx.TimeoutException:
                        pass
                    stats[kind] += 1
                else:
                    name, body, status = rng.choice(HOSTILE)
                    path = "/v1/chat/completions"
                    if isinstance(body, tuple):
                        path, body = body
                    headers = {"Content-Type": "application/json",
                               **({"Authorization": "Bearer wrong"} if body == "wrong key" else HEADERS)}
                    if body == "wrong key":
                        body = {}
                    raw = body if isinstance(body, str) else json.dumps({
                        "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
                    r = await client.post(url + path, content=raw, headers=headers)
                    stats[f"hostile {r.status_code}"] += 1
                    if r.status_code != status:
                        problems.append(f"hostile {name!r} got {r.status_code} (wanted {status}): {r.text[:200]}")
            except httpx.HTTPError as e:
                stats[f"{kind} {type(e).__name__}"] += 1
                problems.append(f"{kind}: {type(e).__name__} {e}")


async def soak(url: str, pid: int, args) -> tuple[collections.Counter, list, list]:
    async with httpx.AsyncClient(timeout=120) as c:
        expected = {}
        for i in range(8):
            for stream in (True, False):
                expected[(i, stream)] = await run_victim(c, url, i, stream)
        stats, problems, samples = collections.Counter(), [], []
        start = time.monotonic()
        deadline = start + args.minutes * 60
        clients = [asyncio.ensure_future(client_loop(n, url, deadline, expected, stats, problems))
                   for n in range(args.clients)]
        while not all(t.done() for t in clients):
            await asyncio.wait(clients, timeout=30)
            try:
                m = await asyncio.wait_for(metrics(c, url), 30)
            except (httpx.HTTPError, asyncio.TimeoutError) as e:
                problems.append(f"/metrics did not answer: {type(e).__name__}")
                continue
            samples.append((time.monotonic() - start, rss_mb(pid), m["gemma4:kv_cache_used_bytes"],
                            m["gemma4:num_requests_running"], sum(stats.values())))
            print(f"  t={samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MB  K/V in use {samples[-1][2] / 1e6:8.2f} "
                  f"MB"
                  f"  running {samples[-1][3]:3.0f}  requests so far {samples[-1][4]}", flush=True)
        await asyncio.gather(*clients)
        for _ in range(100):  # dropped requests end at the engine's next step
            m = await metrics(c, url)
            if m["gemma4:kv_cache_used_bytes"] == 0 and m["gemma4:num_requests_running"] == 0:
                break
            await asyncio.sleep(0.1)
        samples.append(("idle", rss_mb(pid), m["gemma4:kv_cache_used_bytes"], m["gemma4:num_requests_running"],
                        sum(stats.values())))
        return stats, problems, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--model", help="checkpoint (default: the built-in tiny model)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0)
    ap.add_argument("--kv-memory", default="64MB",
                    help="the server's K/V pool, all of it touched within the first minute: pages of a pool touched "
                         "for the first time would count as RSS growth")
    args = ap.parse_args()
    if args.minutes <= 0 or args.clients <= 0:
        ap.error("--minutes and --clients must be positive")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gemma4.cli", "serve", "--port", str(port), "--api-key", KEY,
           "--shutdown-timeout", str(args.shutdown_timeout), "--kv-memory", args.kv_memory,
           *(["--model", args.model] if args.model else [])]
    log_file = tempfile.TemporaryFile("w+")  # a pipe nobody reads fills up and blocks the server's logging
    server = subprocess.Popen(cmd, stderr=log_file, text=True)
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        else:
            raise SystemExit("the server did not start")
        print(f"soak: {args.clients} clients for {args.minutes:g} min against {url} (pid {server.pid})", flush=True)
        stats, problems, samples = asyncio.run(soak(url, server.pid, args))

        # SIGTERM with requests running: they finish or are cancelled within the drain timeout; exit 0
        busy = [subprocess.Popen([sys.executable, "-c", (
            "import httpx,sys\ntry: httpx.post(sys.argv[1], headers={'Authorization': 'Bearer " + KEY + "'}, "
            "json={'messages': [{'role': 'user', 'content': 'go'}], 'max_tokens': 100000}, timeout=600)\n"
            "except Exception: pass"), url + "/v1/chat/completions"]) for _ in range(4)]
        time.sleep(2)
        t = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=args.shutdown_timeout + 60)
        drain = time.monotonic() - t
        for p in busy:
            p.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    log_file.seek(0)
    log = log_file.read()

    errors_5xx = sum(n for k, n in stats.items() if k.split()[-1].startswith("5"))
    growth = samples[-1][1] - samples[min(1, len(samples) - 1)][1]
    print("\nrequests:", ", ".join(f"{k}: {n}" for k, n in sorted(stats.items())))
    print(f"5xx answers: {errors_5xx}; victims changed or failed: {sum('victim' in p for p in problems)}; "
          f"other problems: {sum('victim' not in p for p in problems)}")
    print(f"RSS: first sample {samples[0][1]:.1f} MB, after the first minute "
          f"{samples[min(1, len(samples) - 1)][1]:.1f} MB, idle at the end {samples[-1][1]:.1f} MB ({growth:+.1f} MB); "
          f"K/V in use at the end: {samples[-1][2]:.0f} bytes")
    print(f"SIGTERM with 4 requests running: exit code {code} after {drain:.1f} s "
          f"(--shutdown-timeout {args.shutdown_timeout:g})")
    for p in problems[:20]:
        print("  problem:", p)
    if "Traceback" in log:
        print("server log has a traceback:\n" + log[log.index("Traceback"):][:3000])
    ok = not errors_5xx and not problems and samples[-1][2] == 0 and code == 0 and \
        drain <= args.shutdown_timeout + 5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

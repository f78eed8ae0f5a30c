"""Change streams against polling on MongoDB: python benchmarks/mongo_push.py [--url URL] [--calls N].

For MongoQueue(url, change_streams=True) and change_streams=False, side by side:
an idle worker in a separate process, a near-empty collection (prefix "mq_push"),
and one call at a time with a random pause between calls so the worker is idle
when each job arrives. Measures the enqueue_wait round trip of a no-op task, and
how long after enqueue() returned the task started (its time.time() at start,
read from the job's result). The first 5 calls of each are warm-up. Without
--url it starts a throwaway SecantusDB (a slow Python server: keep N modest).
"""

import argparse
import inspect
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monsterqueue

WARMUP = 5
SECANTUS = """if True:
    import sys, threading
    from secantus import SecantusDBServer
    SecantusDBServer(host="127.0.0.1", port=int(sys.argv[1]), storage_path=sys.argv[2],
                     ttl_sweep_seconds=1.0).start()
    threading.Event().wait()
"""


def build(url: str, options: dict) -> monsterqueue.Queue:
    return monsterqueue.MongoQueue(url, collection_prefix="mq_push", **options)


def work(url: str, options: dict) -> None:
    """The worker process: both tasks, until SIGTERM."""
    queue = build(url, options)

    @queue.task()
    def noop() -> None:
        pass

    @queue.task()
    def stamp() -> float:
        return time.time()  # first thing: when the job started

    signal.signal(signal.SIGTERM, lambda signum, frame: queue.stop())
    queue.process_loop()
    queue.close()


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return ms[len(ms) // 2], ms[int(len(ms) * 0.95)]


def measure(url: str, options: dict, calls: int) -> tuple[float, float, float, float]:
    queue = build(url, options)
    queue.reset_storage()
    worker = multiprocessing.get_context("spawn").Process(target=work, args=(url, options), daemon=True)
    worker.start()
    try:
        job, deadline = queue.enqueue("noop", {}), time.monotonic() + 60
        while queue.retrieve_job(job.id).status.state != monsterqueue.JOB_STATE_DONE:  # the worker is up
            if not worker.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the worker process did not start (exit code {worker.exitcode})")
            time.sleep(0.05)
        waits = []
        for _ in range(calls):
            time.sleep(random.uniform(0.02, 0.08))
            started = time.perf_counter()
            queue.enqueue_wait("noop", {})
            waits.append(time.perf_counter() - started)
        starts = []
        for _ in range(calls):
            time.sleep(random.uniform(0.05, 0.15))
            job = queue.enqueue("stamp", {})
            enqueued = time.time()
            while (job := queue.retrieve_job(job.id)).status.state != monsterqueue.JOB_STATE_DONE:
                time.sleep(0.02)
            starts.append(job.result() - enqueued)
    finally:
        worker.terminate()  # SIGTERM: the worker's loop stops and it closes its queue
        worker.join(30)
        if worker.is_alive():
            worker.kill()
            worker.join()
        queue.reset_storage()
        queue.close()
    return (*percentiles(waits[WARMUP:]), *percentiles(starts[WARMUP:]))


def start_secantus() -> tuple[str, subprocess.Popen, str]:
    import pymongo
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="mq-push-")
    server = subprocess.Popen([sys.executable, "-c", SECANTUS, str(port), folder],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mongodb://127.0.0.1:{port}/mq_bench"
    deadline = time.monotonic() + 60
    while True:
        try:
            with pymongo.MongoClient(url, serverSelectionTimeoutMS=200) as client:
                client.admin.command("ping")
            return url, server, folder
        except pymongo.errors.PyMongoError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                server.wait()
                shutil.rmtree(folder, ignore_errors=True)
                sys.exit("SecantusDB did not start: pip install secantusdb, or pass --url")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="mongodb://host:port/dbname (default: a throwaway SecantusDB)")
    parser.add_argument("--calls", type=int, default=60,
                        help=f"calls per measurement, the first {WARMUP} warm-up (default 60)")
    args = parser.parse_args()
    if args.calls <= WARMUP:
        parser.error(f"--calls must be more than the {WARMUP} warm-up calls")
    server = folder = None
    url = args.url
    if url is None:
        url, server, folder = start_secantus()
    try:
        has_option = "change_streams" in inspect.signature(monsterqueue.MongoQueue.__init__).parameters
        print(f"{url}{' (throwaway SecantusDB)' if server else ''}: N={args.calls} calls per measurement, "
              f"first {WARMUP} warm-up, one idle worker process\n")
        print("| configuration | enqueue_wait p50 ms | p95 ms | idle-worker start p50 ms | p95 ms |")
        print("|---|--:|--:|--:|--:|")
        for flag in (True, False):
            name = f"`change_streams={flag}`"
            if not has_option:
                if flag:
                    print(f"| {name} | skipped: this MongoQueue has no change_streams option | | | |")
                    continue
                name += " (option absent: polling)"
            options = {"change_streams": flag} if has_option else {}
            try:
                row = measure(url, options, args.calls)
            except Exception as exc:  # a configuration that fails is a row, not the end
                print(f"| {name} | failed: {type(exc).__name__}: {exc} | | | |")
                continue
            print(f"| {name} | " + " | ".join(f"{value:.1f}" for value in row) + " |")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

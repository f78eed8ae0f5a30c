"""Measure how soon a cancel reaches a running job: python benchmarks/cancel.py [--url URL ...].

For each URL (default: memory:// and this machine's Redis), a worker runs a task
that sleeps in short steps; the script enqueues a job, waits until it runs,
calls cancel_job, and times how long until the task's thread is interrupted
(JobCancelledError raised in it). It prints p50 and p95 per backend, with the
default lease (a heartbeat every 10 s), so that a cancel left for the heartbeat
would show as seconds.

A Redis or MongoDB URL uses key or collection prefix "mq-cancel", erased before
and after.
"""

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monsterqueue


def latencies(url: str, samples: int) -> list[float]:
    prefix = {"redis": {"key_prefix": "mq-cancel"}, "mongodb": {"collection_prefix": "mq_cancel"}}
    queue = monsterqueue.Queue(url, **prefix.get(url.split(":")[0], {}))
    queue.reset_storage()
    started, interrupted = threading.Event(), []

    @queue.task()
    def sleeps() -> None:
        started.set()
        try:
            for _ in range(6000):
                time.sleep(0.01)
        except monsterqueue.JobCancelledError:
            interrupted.append(time.perf_counter())
            raise

    worker = threading.Thread(target=queue.process_loop)
    worker.start()
    took = []
    try:
        for _ in range(samples):
            started.clear()
            job = sleeps.enqueue()
            started.wait(30)
            time.sleep(0.05)
            before, count = time.perf_counter(), len(interrupted)
            queue.cancel_job(job.id)
            while len(interrupted) == count:
                time.sleep(0.001)
            took.append(interrupted[-1] - before)
    finally:
        queue.stop()
        worker.join()
        queue.reset_storage()
        queue.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", action="append", help="a queue URL (repeat for more)")
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    print("| backend | cancels | p50 ms | p95 ms |\n|---|--:|--:|--:|")
    for url in args.url or ["memory://", "redis://127.0.0.1:6379/14"]:
        took = sorted(latencies(url, args.samples))
        p95 = took[min(len(took) - 1, round(0.95 * len(took)) - 1)]
        print(f"| {url} | {len(took)} | {statistics.median(took) * 1000:.1f} | {p95 * 1000:.1f} |")


if __name__ == "__main__":
    main()

"""Measure what job control costs the server: python benchmarks/job_control.py [--url URL] [--jobs N].

1. Progress: a task calls job.set_progress 100,000 times, in a tight loop and
   then spread over ~5 s; count the server writes that made (the calls of
   _save_progress, plus the finish that stores the last value).
2. Bulk actions: with N jobs stored (a tenth of them failed, a tenth enqueued,
   the rest done), time retry_jobs() and delete_jobs("done"), and read the
   longest single command the server ran meanwhile from SLOWLOG (every command
   logged while they run).

Redis only (the SLOWLOG); it uses key prefix "mq-control" on the DB of the URL
and changes the server's slowlog settings while it runs, then restores them.
"""

import argparse
import os
import sys
import threading
import time

import redis

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monsterqueue


def progress_writes(queue: monsterqueue.RedisQueue, calls: int) -> None:
    class Counting(monsterqueue.Task):
        name = "counting"

        def run(self, job: monsterqueue.Job) -> None:
            for i in range(calls):
                job.set_progress({"done": i + 1, "total": calls})
                if job.params["spread"] and i % 100 == 0:
                    time.sleep(0.005)
            job.success("counted")

    queue.register_task(Counting())
    saves = []
    save_progress = queue._save_progress
    queue._save_progress = lambda progress: saves.append(len(progress)) or save_progress(progress)
    worker = threading.Thread(target=queue.process_loop)
    worker.start()
    for spread in (False, True):
        saves.clear()
        started = time.perf_counter()
        job = queue.enqueue_wait("counting", {"spread": spread}, timeout=600)
        took = time.perf_counter() - started
        print(f"{calls:,} set_progress calls in {took:.2f} s: {len(saves)} progress writes, "
              f"+ 1 finish that stores the last value ({job.progress})")
    queue.stop()
    worker.join()


def fill(queue: monsterqueue.RedisQueue, jobs: int) -> None:
    @queue.task()
    def work(i: int) -> int:
        if i % 9 == 0:
            raise ValueError("one in nine fails")
        return i

    started = time.perf_counter()
    processed = jobs - jobs // 10
    queue.enqueue_many("work", ({"i": i} for i in range(processed)))
    worker = threading.Thread(target=queue.process_loop)
    worker.start()
    while queue.stats()["counts"]["work"]["enqueued"] or queue.stats()["counts"]["work"]["running"]:
        time.sleep(0.2)
    queue.stop()
    worker.join()
    queue.enqueue_many("later", ({"i": i} for i in range(jobs - processed)))
    counts = queue.stats()["counts"]
    print(f"stored {jobs:,} jobs in {time.perf_counter() - started:.1f} s: "
          f"{counts['work']['done']:,} done, {counts['work']['failed']:,} failed, "
          f"{counts['later']['enqueued']:,} enqueued")


def timed(control: redis.Redis, what: str, action) -> None:
    control.slowlog_reset()
    started = time.perf_counter()
    changed = action()
    took = time.perf_counter() - started
    entries = [entry for entry in control.slowlog_get(1_000_000)
               if not str(entry["command"]).lstrip("b'").upper().startswith(("SLOWLOG", "CONFIG"))]
    longest = max(entries, key=lambda entry: entry["duration"])
    command = longest["command"]
    command = command.decode() if isinstance(command, bytes) else str(command)
    print(f"| {what} | {changed:,} | {took * 1000:,.0f} | {longest['duration'] / 1000:.1f} ms "
          f"({command.split()[0]}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    queue = monsterqueue.RedisQueue(args.url, key_prefix="mq-control", concurrency=8)
    control = redis.Redis.from_url(args.url)
    queue.reset_storage()
    progress_writes(queue, args.calls)
    queue.reset_storage()
    fill(queue, args.jobs)
    saved = control.config_get("slowlog-*")
    control.config_set("slowlog-log-slower-than", 0)
    control.config_set("slowlog-max-len", 1_000_000)
    try:
        print("\n| bulk action | jobs changed | ms in all | longest single command |")
        print("|---|--:|--:|--:|")
        timed(control, "retry_jobs()", queue.retry_jobs)
        timed(control, 'delete_jobs("enqueued")', lambda: queue.delete_jobs("enqueued"))
        timed(control, 'delete_jobs("done")', lambda: queue.delete_jobs("done"))
    finally:
        for name, value in saved.items():
            control.config_set(name, value)
        queue.reset_storage()
        queue.close()


if __name__ == "__main__":
    main()

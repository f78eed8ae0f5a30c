"""How late delayed jobs start: python benchmarks/delays.py [--url URL] [--jobs N].

Enqueues N jobs with delays spread over 0.2-2 s while a worker waits idle, then
reports how long after its scheduled time each job started (started - scheduled).
"""

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monsterqueue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--jobs", type=int, default=100)
    args = parser.parse_args()
    own = {"key_prefix": "mq-delays"} if args.url.startswith("redis") else {"collection_prefix": "mq_delays"}
    queue = monsterqueue.Queue(args.url, **own)
    queue.reset_storage()
    queue.register_task(Noop())
    worker = threading.Thread(target=queue.process_loop)
    worker.start()
    time.sleep(0.5)
    jobs = [queue.enqueue("noop", delay=0.2 + 1.8 * i / args.jobs) for i in range(args.jobs)]
    time.sleep(2.5)
    while any(queue.retrieve_job(job.id).status.state != "done" for job in jobs[-3:]):
        time.sleep(0.1)
    queue.stop()
    late = sorted((job.status.started - job.status.scheduled).total_seconds() * 1000
                  for job in (queue.retrieve_job(job.id) for job in jobs))
    print(f"{args.url}: {len(late)} delayed jobs started late by p50 {statistics.median(late):.1f} ms, "
          f"p95 {late[int(len(late) * 0.95)]:.1f} ms, max {late[-1]:.1f} ms; none early: {late[0] >= 0}")
    queue.reset_storage()
    queue.close()


class Noop(monsterqueue.Task):
    name = "noop"

    def run(self, job: monsterqueue.Job) -> None:
        job.success()


if __name__ == "__main__":
    main()

"""Time list_jobs and stats with many jobs stored.

    python benchmarks/listing.py [--url URL] [--jobs N] [--shards N]

Fills a queue of its own (key prefix "mq-listing-SHARDS") with N jobs of three tasks,
runs a third of them to done (one in ten failing; on MongoDB their outcomes are
stored directly), then times each listing query as the CLI and the dashboard
make it: one page of 50, newest first.
"""

import argparse
import json
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
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=1, help="Redis: spread the queue over this many shards")
    args = parser.parse_args()
    own = ({"key_prefix": f"mq-listing-{args.shards}", "shards": args.shards} if args.url.startswith("redis")
           else {"collection_prefix": "mq_listing"})
    queue = monsterqueue.Queue(args.url, concurrency=8, **own)
    queue.reset_storage()

    @queue.task()
    def work(i: int) -> int:
        if i % 10 == 0:
            raise ValueError("one in ten fails")
        return i

    started = time.perf_counter()
    for name in ("work", "report", "mail"):
        queue.enqueue_many(name, ({"i": i} for i in range(args.jobs // 3)))
    queue.enqueue_many("rare", ({"i": i} for i in range(10)))
    print(f"enqueued {args.jobs // 3 * 3 + 10:,} jobs in {time.perf_counter() - started:.1f}s")
    if isinstance(queue, monsterqueue.MongoQueue):
        # SecantusDB, the MongoDB server here, claims too slowly to run thousands of jobs:
        # store their outcomes as the finish step would, one update_many per outcome.
        now = queue._now()
        failing = [doc["_id"] for doc in queue._jobs.find({"task": "work"}, projection={"params": True})
                   if json.loads(doc["params"])["i"] % 10 == 0]
        error = "ValueError: one in ten fails"
        for query, outcome in (({"task": "work", "_id": {"$nin": failing}}, {"state": "done", "result": "1"}),
                               ({"_id": {"$in": failing}}, {"state": "failed", "error": error})):
            queue._jobs.update_many(query, {"$set": {"started": now, "done": now, "delivery": 1, **outcome}})
    else:
        worker = threading.Thread(target=queue.process_loop)
        worker.start()
        while queue.stats()["counts"]["work"]["enqueued"]:
            time.sleep(0.5)
        queue.stop()
        worker.join()

    queries = {
        "list_jobs(limit=50, newest_first=True)": dict(limit=50, newest_first=True),
        "list_jobs(limit=50, offset=5000, newest_first=True)": dict(limit=50, offset=5000, newest_first=True),
        "list_jobs(state='enqueued', limit=50)": dict(state="enqueued", limit=50),
        "list_jobs(state='failed', limit=50, newest_first=True)": dict(state="failed", limit=50,
                                                                       newest_first=True),
        "list_jobs(task_name='mail', limit=50, newest_first=True)": dict(task_name="mail", limit=50,
                                                                          newest_first=True),
        "list_jobs(state='done', task_name='work', limit=50)": dict(state="done", task_name="work", limit=50),
        "list_jobs(task_name='rare', limit=50), 10 such jobs": dict(task_name="rare", limit=50),
        "list_jobs(state='enqueued', task_name='rare', limit=50)": dict(state="enqueued", task_name="rare",
                                                                         limit=50),
    }
    print(f"\n| query, {args.jobs:,} jobs stored | median ms | jobs returned |\n|---|--:|--:|")
    for name, query in queries.items():
        times = []
        for _ in range(7):
            started = time.perf_counter()
            jobs = queue.list_jobs(**query)
            times.append((time.perf_counter() - started) * 1000)
        print(f"| `{name}` | {statistics.median(times):.1f} | {len(jobs)} |")
    times = []
    for _ in range(7):
        started = time.perf_counter()
        queue.stats()
        times.append((time.perf_counter() - started) * 1000)
    print(f"| `stats()` | {statistics.median(times):.1f} | |")
    queue.reset_storage()
    queue.close()


if __name__ == "__main__":
    main()

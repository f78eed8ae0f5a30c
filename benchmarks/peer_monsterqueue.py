"""monsterqueue adapter, written against the public API only."""
import os
import signal
import sys
import threading

# Work from a plain checkout too (without `pip install -e .`).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import SyncClient, task_result

import monsterqueue

CONFIGS = {
    "": "Queue(url, concurrency={threads}): 1 process x {threads} threads, process_loop(); enqueue_wait()",
    "priorities": "the same, its jobs enqueued at 21 priorities (-10..10) in turn",
}


def make_queue(url, threads):
    q = monsterqueue.Queue(url, concurrency=threads)

    @q.task("noop")
    def noop(**params):
        return task_result(params["i"])

    return q


class Client(SyncClient):
    def __init__(self, url, variant):
        self.q = make_queue(url, 1)
        self.ids = []
        self.pending = None
        # The "priorities" variant spreads its jobs over 21 priorities, -10 to 10.
        self.spread = 21 if variant == "priorities" else 1

    def reset(self):
        self.q.reset_storage()

    def enqueue(self, i):
        self.ids.append(self.q.enqueue("noop", {"i": i}, priority=i % self.spread - self.spread // 2).id)

    def enqueue_batch(self, n):
        self.q.enqueue_many("noop", [{"i": i} for i in range(n)])

    def enqueue_wait(self, i):
        assert self.q.enqueue_wait("noop", {"i": i}, timeout=5.0).result() == task_result(i)

    def _is_done(self, job_id):
        return self.q.retrieve_job(job_id).status.state == "done"

    def done(self, n):
        # The API has no "count finished jobs", and checking every job while
        # the worker runs would cost about one extra round trip per job. Jobs
        # are taken roughly in order, so poll only the newest; the few that
        # may still be running then are picked up by stragglers(), off the
        # clock unless some really were unfinished.
        # With priorities, the newest of the lowest priority: the last to run.
        return self._is_done(self.ids[(len(self.ids) - 1) // self.spread * self.spread])

    def stragglers(self, n):
        if self.pending is None:
            self.pending = self.ids[:-1]
        self.pending = [j for j in self.pending if not self._is_done(j)]
        return len(self.pending)

    def close(self):
        self.q.close()


def worker(url, variant, threads):
    return serve(make_queue(url, threads))


def serve(q):
    """The body of a worker process of ``q``: until SIGTERM, process_loop, then stop."""
    stop = threading.Event()

    def run():
        # stop() waits for process_loop to return, so it can't be called from a
        # signal handler on the loop's own thread: run the loop on another one.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        loop = threading.Thread(target=q.process_loop)
        loop.start()
        stop.wait()
        q.stop()
        loop.join()
        q.close()

    return run

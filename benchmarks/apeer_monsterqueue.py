"""monsterqueue adapter for async_bench.py, written against the public asyncio API only."""
import os
import sys

# Work from a plain checkout too (without `pip install -e .`).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import task_result
from peer_monsterqueue import serve

import monsterqueue

THREADS = 8
VERSION = monsterqueue.__version__
CONFIG = (f"Queue(url, concurrency={THREADS}, async_concurrency={{concurrency}}).aenqueue(); 1 process, "
          "process_loop(), async def task on its event loop; wait: aenqueue_wait(timeout=5.0)")


def make_queue(url, concurrency):
    q = monsterqueue.Queue(url, concurrency=THREADS, async_concurrency=concurrency)

    @q.task("noop")
    async def noop(**params):
        return task_result(params["i"])

    return q


class Client:
    note = ""

    async def connect(self, url):
        self.q, self.ids, self.pending = make_queue(url, 1), [], None

    async def enqueue(self, i):
        self.ids.append((await self.q.aenqueue("noop", {"i": i})).id)

    async def enqueue_wait(self, i):
        job = await self.q.aenqueue_wait("noop", {"i": i}, timeout=5.0)
        assert job.result() == task_result(i), job

    async def _is_done(self, job_id):
        return (await self.q.aretrieve_job(job_id)).status.state == "done"

    async def done(self, n):
        # As in peer_monsterqueue: there is no "count finished jobs", so poll the job
        # stored last; stragglers() then checks all the others, off the clock unless
        # some really were unfinished.
        return await self._is_done(self.ids[-1])

    async def stragglers(self):
        if self.pending is None:
            self.pending = self.ids[:-1]
        self.pending = [j for j in self.pending if not await self._is_done(j)]
        return len(self.pending)

    async def close(self):
        self.q.close()


def worker(url, concurrency):
    return serve(make_queue(url, concurrency))

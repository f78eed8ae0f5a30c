"""SAQ adapter: Redis queue, asyncio worker with `concurrency` N (SAQ runs
async tasks on its event loop; there is no thread setting)."""
import asyncio
import logging
import time

from _common import task_result
from saq import Queue, Worker

CONFIG = ("Redis queue, 1 process, Worker(concurrency={threads}) on one asyncio loop, async task;"
          " job.refresh(until_complete) waits via pub/sub")


async def noop(ctx, *, i):
    return task_result(i)


class Client:
    # SAQ's client API is async: run whole loops inside one event loop so the
    # per-call cost is SAQ's, not asyncio.run()'s.
    def __init__(self, url, variant):
        self.note = ""
        self.loop = asyncio.new_event_loop()
        self.queue = Queue.from_url(url, name="bench")
        self.loop.run_until_complete(self.queue.connect())

    def enqueue_jobs(self, n):
        async def go():
            for i in range(n):
                await self.queue.enqueue("noop", i=i)
        self.loop.run_until_complete(go())

    def wait_latencies(self, k, warmup=5):
        async def go():
            nonlocal lost
            out = []
            for i in range(warmup + k):
                t = time.perf_counter()
                job = await self.queue.enqueue("noop", i=i)
                try:
                    await job.refresh(until_complete=5)
                except asyncio.TimeoutError:
                    # refresh() reads the job, then (re)subscribes to updates:
                    # a job finishing in between is only seen at the timeout.
                    # Keep the sample as it is, and say so.
                    await job.refresh()
                    lost += 1
                assert job.result == task_result(i), job
                out.append(time.perf_counter() - t)
            return out[warmup:]

        lost = 0
        latencies = self.loop.run_until_complete(go())
        if lost:
            self.note = f"{lost} wait(s) missed the pub/sub update and took the 5 s timeout"
        return latencies

    def done(self, n):
        # A job leaves the "incomplete" zset in the same transaction that stores its result.
        return self.loop.run_until_complete(self.queue.count("incomplete")) == 0

    def stragglers(self, n):
        return 0

    def close(self):
        self.loop.run_until_complete(self.queue.disconnect())
        self.loop.close()


def worker(url, variant, threads):
    # On SIGTERM SAQ cancels its idle dequeue loops and warns about it; not news.
    logging.getLogger("saq").setLevel(logging.ERROR)

    async def main():
        queue = Queue.from_url(url, name="bench")
        await queue.connect()
        # start() returns on SIGTERM/SIGINT (it installs its own handlers).
        await Worker(queue, functions=[noop], concurrency=threads).start()
        await queue.disconnect()

    return lambda: asyncio.run(main())

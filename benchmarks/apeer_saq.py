"""SAQ adapter for async_bench.py: Redis queue, one asyncio Worker(concurrency=N)."""
import asyncio
import importlib.metadata
import logging

from _common import task_result
from saq import Queue, Worker

VERSION = importlib.metadata.version("saq")
CONFIG = ("Queue.from_url(url).enqueue(); 1 process, Worker(concurrency={concurrency}), async task; "
          "wait: enqueue() + job.refresh(until_complete=5) via pub/sub")


async def noop(ctx, *, i):
    return task_result(i)


class Client:
    note, lost = "", 0

    async def connect(self, url):
        self.queue = Queue.from_url(url, name="bench")
        await self.queue.connect()

    async def enqueue(self, i):
        await self.queue.enqueue("noop", i=i)

    async def enqueue_wait(self, i):
        job = await self.queue.enqueue("noop", i=i)
        try:
            await job.refresh(until_complete=5)
        except asyncio.TimeoutError:
            # refresh() reads the job, then listens for its update: a job finishing in
            # between is only seen at the timeout. Keep the sample as it is, and say so.
            await job.refresh()
            self.lost += 1
            self.note = f"{self.lost} wait(s) missed the pub/sub update and took the 5 s timeout"
        assert job.result == task_result(i), job

    async def done(self, n):
        # A job leaves the "incomplete" zset in the transaction that stores its result.
        return await self.queue.count("incomplete") == 0

    async def close(self):
        await self.queue.disconnect()


def worker(url, concurrency):
    # On SIGTERM SAQ cancels its idle dequeue loops and warns about it; not news.
    logging.getLogger("saq").setLevel(logging.ERROR)

    async def main():
        queue = Queue.from_url(url, name="bench")
        await queue.connect()
        await Worker(queue, functions=[noop], concurrency=concurrency).start()  # returns on SIGTERM
        await queue.disconnect()

    return lambda: asyncio.run(main())

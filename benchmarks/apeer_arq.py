"""arq adapter for async_bench.py: one asyncio Worker(max_jobs=N). arq has no pub/sub:
its worker polls the queue and job.result() polls for the result."""
import asyncio
import importlib.metadata

from _common import task_result
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import default_queue_name
from arq.jobs import ResultNotFound
from arq.worker import Worker

# Both polls default to 0.5 s, which would put every round trip near half a second.
POLL_S = 0.01
VERSION = importlib.metadata.version("arq")
CONFIG = (f"create_pool().enqueue_job(); 1 process, Worker(max_jobs={{concurrency}}, poll_delay={POLL_S}), "
          f"async task; wait: enqueue_job() + job.result(timeout=5, poll_delay={POLL_S}), polling")


async def noop(ctx, *, i):
    return task_result(i)


class Client:
    note, races = "", 0

    async def connect(self, url):
        self.pool = await create_pool(RedisSettings.from_dsn(url))

    async def enqueue(self, i):
        await self.pool.enqueue_job("noop", i=i)

    async def enqueue_wait(self, i):
        job = await self.pool.enqueue_job("noop", i=i)
        try:
            result = await job.result(timeout=5, poll_delay=POLL_S)
        except ResultNotFound:
            # result() GETs the result, then ZSCOREs the queue (not pipelined): a job
            # finishing in between looks "not in queue". It is done: read its result.
            result = (await job.result_info()).result
            self.races += 1
            self.note = f"{self.races} job.result() call(s) raised ResultNotFound for a finished job"
        assert result == task_result(i), result

    async def done(self, n):
        # finish_job() drops a job from the queue zset in the transaction that stores its result.
        return await self.pool.zcard(default_queue_name) == 0

    async def close(self):
        await self.pool.aclose()


def worker(url, concurrency):
    def run():
        asyncio.set_event_loop(asyncio.new_event_loop())  # Worker() takes the current loop
        Worker(functions=[noop], redis_settings=RedisSettings.from_dsn(url), max_jobs=concurrency,
               poll_delay=POLL_S).run()  # returns on SIGTERM

    return run

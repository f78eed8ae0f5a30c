"""RQ adapter. RQ has no threaded worker: SimpleWorker (runs jobs in-process,
no fork per job) is its fastest single-process mode, so it uses one thread."""
from _common import SyncClient, task_result
from redis import Redis
from rq import Queue, SimpleWorker

CONFIG = "SimpleWorker, 1 process x 1 thread (RQ has no threaded worker; the default Worker forks per job)"
QUEUE = "bench"


def noop(i):
    return task_result(i)


class Client(SyncClient):
    def __init__(self, url, variant):
        self.redis = Redis.from_url(url)
        self.queue = Queue(QUEUE, connection=self.redis)
        self.finished = self.queue.finished_job_registry.key

    def enqueue(self, i):
        return self.queue.enqueue(noop, i)

    def enqueue_wait(self, i):
        # Blocks on XREAD of the job's result stream (RQ's own wait primitive).
        res = self.enqueue(i).latest_result(timeout=5)
        assert res is not None and res.return_value == task_result(i), res

    def done(self, n):
        # Result and finished-registry entry are written in the same pipeline.
        return self.redis.zcard(self.finished) >= n

    def close(self):
        self.redis.close()


def worker(url, variant, threads):
    redis = Redis.from_url(url)
    w = SimpleWorker([Queue(QUEUE, connection=redis)], connection=redis)
    # SIGTERM -> RQ's warm shutdown; logging at WARNING (= `rq worker --quiet`).
    return lambda: w.work(logging_level="WARNING")

"""Huey adapter: RedisHuey with the thread consumer (`huey_consumer -k thread
-w N`). Variant "notify" turns on notify_result, so waiting for a result
BLPOPs a notification key instead of polling with backoff."""
from _common import SyncClient, task_result
from huey import RedisHuey

CONFIGS = {
    "": "RedisHuey, thread consumer, 1 process x {threads} threads (`-k thread -w {threads}`);"
        " result.get() polls",
    "notify": "RedisHuey(notify_result=True), thread consumer, 1 process x {threads} threads;"
              " result.get() BLPOPs",
}


def make_huey(url, variant):
    huey = RedisHuey("bench", url=url, notify_result=(variant == "notify"))

    @huey.task(name="noop")
    def noop(i):
        return task_result(i)

    return huey, noop


class Client(SyncClient):
    def __init__(self, url, variant):
        self.huey, self.noop = make_huey(url, variant)

    def enqueue(self, i):
        return self.noop(i)

    def enqueue_wait(self, i):
        assert self.noop(i).get(blocking=True, timeout=5) == task_result(i)

    def done(self, n):
        # Results live in one hash; nobody reads (pops) them during the run.
        return self.huey.storage.result_store_size() >= n

    def close(self):
        self.huey.storage.pool.disconnect()


def worker(url, variant, threads):
    huey, _ = make_huey(url, variant)
    consumer = huey.create_consumer(workers=threads, worker_type="thread")
    return consumer.run  # installs its own SIGTERM (immediate stop) handler

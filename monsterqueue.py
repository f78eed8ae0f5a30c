"""monsterqueue: a task queue in one file, on Redis, MongoDB or memory.

A Python port of tsuru/monsterqueue. Register tasks, enqueue jobs, run
workers on one machine or a hundred, and wait for results::

    q = monsterqueue.Queue("redis://localhost:6379/0")

    @q.task()
    def add(a, b):
        return a + b

    print(q.enqueue_wait("add", {"a": 1, "b": 2}).result())   # a worker runs q.process_loop()

Only the standard library is needed to import this module: ``redis`` and
``pymongo`` are imported by the backend that uses them.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

__version__ = "0.1.0"
__all__ = [
    "JOB_STATE_DONE",
    "JOB_STATE_ENQUEUED",
    "JOB_STATE_RUNNING",
    "STACK_TRACE_LIMIT",
    "Job",
    "JobError",
    "JobParams",
    "JobResult",
    "JobStatus",
    "MemoryQueue",
    "MongoQueue",
    "MonsterQueueError",
    "NoJobResultError",
    "NoJobResultSetError",
    "NoSuchJobError",
    "Queue",
    "QueueWaitTimeoutError",
    "RedisQueue",
    "Task",
]

logger = logging.getLogger("monsterqueue")
logger.addHandler(logging.NullHandler())


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# The states a job moves through, in order.
JOB_STATE_ENQUEUED = "enqueued"
JOB_STATE_RUNNING = "running"
JOB_STATE_DONE = "done"

# Bytes of the enqueuing caller's stack kept on each job, innermost frames first.
STACK_TRACE_LIMIT = 2048

# Defaults of the Queue options.
DEFAULT_CONCURRENCY = 8         # worker threads per process_loop
DEFAULT_WAIT_TIMEOUT = 30.0     # seconds enqueue_wait waits for a result
IDLE_WAKE_INTERVAL = 1.0        # an idle worker wakes this often even if nothing is pushed


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class MonsterQueueError(Exception):
    """Base class of every error this module raises on purpose."""


class NoJobResultError(MonsterQueueError):
    """The job has no result yet: it is still enqueued or running."""

    def __init__(self, message: str = "no result available") -> None:
        super().__init__(message)


class NoJobResultSetError(MonsterQueueError):
    """The task returned without calling success() or error()."""

    def __init__(self, message: str = "task didn't set job result") -> None:
        super().__init__(message)


class NoSuchJobError(MonsterQueueError, LookupError):
    """No job is stored under that id."""

    def __init__(self, message: str = "no job found") -> None:
        super().__init__(message)


class QueueWaitTimeoutError(MonsterQueueError, TimeoutError):
    """enqueue_wait ran out of time; the job stays queued and runs later.

    The enqueued job is in the ``job`` attribute.
    """

    def __init__(self, message: str = "timeout waiting for result", job: Job | None = None) -> None:
        super().__init__(message)
        self.job = job


class JobError(MonsterQueueError):
    """The task reported an error, or raised; the message is the error text."""


# ---------------------------------------------------------------------------
# The contract: JobStatus, Task, Job, Queue
# ---------------------------------------------------------------------------

JobParams = dict[str, Any]
JobResult = Any


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """Where a job is in its life, with timezone-aware UTC times."""

    state: str
    enqueued: datetime | None
    started: datetime | None = None
    done: datetime | None = None


class Task(abc.ABC):
    """A unit of work, registered on a Queue under its ``name``."""

    name: str

    @abc.abstractmethod
    def run(self, job: Job) -> None:
        """Do the job's work and report it with job.success() or job.error()."""


class FunctionTask(Task):
    """A task made by @queue.task from a function of the job's params."""

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        self.name = name
        self.function = function

    def run(self, job: Job) -> None:
        job.success(self.function(**job.params))


class Job:
    """One enqueued call of a task: its params, status and outcome."""

    def __init__(self, queue: Queue, job_id: str, task_name: str, params: JobParams,
                 status: JobStatus, enqueue_stack: str, *, delivery: int = 0,
                 result: JobResult = None, error: str | None = None) -> None:
        self._queue = queue
        self._id = job_id
        self._task_name = task_name
        self._params = params
        self._status = status
        self._enqueue_stack = enqueue_stack
        self._delivery = delivery        # which claim of the job this object holds
        self._result = result
        self._error = error
        self._reported = False           # success() or error() was called

    id = property(lambda self: self._id, doc="The job's id, unique in its queue.")
    task_name = property(lambda self: self._task_name, doc="The name of the task that runs it.")
    params = property(lambda self: self._params, doc="The params it was enqueued with.")
    queue = property(lambda self: self._queue, doc="The queue it belongs to.")
    status = property(lambda self: self._status, doc="Its JobStatus when this object was read.")
    enqueue_stack = property(lambda self: self._enqueue_stack,
                             doc="The enqueuing caller's stack, innermost frames kept.")

    def success(self, result: JobResult = None) -> bool:
        """Record ``result`` (JSON-compatible); return True if a waiter received it."""
        try:
            encoded = _encode(result)
        except TypeError as exc:
            return self._report(error=f"result is not JSON-compatible: {exc}")
        return self._report(result=encoded)

    def error(self, err: BaseException | str) -> bool:
        """Record ``err`` as the job's error; return True if a waiter received it."""
        return self._report(error=err if isinstance(err, str) else _describe(err))

    def result(self) -> JobResult:
        """Return the result; raise NoJobResultError, NoJobResultSetError or JobError."""
        if self._status.state != JOB_STATE_DONE:
            raise NoJobResultError()
        if self._error == NoJobResultSetError().args[0]:
            raise NoJobResultSetError()
        if self._error is not None:
            raise JobError(self._error)
        return self._result

    def _report(self, result: str | None = None, error: str | None = None) -> bool:
        self._reported = True
        received = self._queue._finish(self, result=result, error=error)
        if received is None:
            logger.warning("job %s was not recorded: its worker no longer holds it", self._id)
        return bool(received)

    def __repr__(self) -> str:
        return f"<Job {self._id} {self._task_name} {self._status.state}>"


class Queue(abc.ABC):
    """A job queue; ``Queue(url)`` builds the backend the URL names.

    Everything that is the same on every backend lives here: the task
    registry, validation and encoding, the enqueue stack, the worker threads
    and the shape of waiting. A backend supplies the storage primitives at
    the end of this class, each atomic on its server.
    """

    def __new__(cls, url: str | None = None, **options: Any) -> Queue:
        if cls is Queue:
            cls = _backend_for(url)
        return super().__new__(cls)

    def __init__(self, url: str | None = None, *, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self._tasks: dict[str, Task] = {}
        self._loop_lock = threading.Lock()        # guards _stopping and _loop_done
        self._stopping: threading.Event | None = None
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._busy = 0                            # jobs running on worker threads
        self._idle = threading.Condition()        # signalled when _busy drops

    # -- tasks ---------------------------------------------------------------

    def register_task(self, task: Task) -> None:
        """Make ``task`` runnable by this queue's workers; ValueError on a duplicate name."""
        if task.name in self._tasks:
            raise ValueError(f"task {task.name!r} is already registered")
        self._tasks[task.name] = task

    def task(self, name: str | Callable[..., Any] | None = None) -> Any:
        """Register a function(**params) -> result as a task: ``@q.task()`` or ``@q.task("name")``.

        Returning records the value as the result; raising records the error.
        """
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            self.register_task(FunctionTask(name if isinstance(name, str) else function.__name__,
                                            function))
            return function
        return register(name) if callable(name) else register

    # -- producing -----------------------------------------------------------

    def enqueue(self, task_name: str, params: JobParams | None = None) -> Job:
        """Store a job for ``task_name``; TypeError (nothing stored) if params aren't JSON."""
        return self._enqueue(task_name, [params], waiter_timeout=None)[0]

    def enqueue_many(self, task_name: str, params_list: Iterable[JobParams | None]) -> list[Job]:
        """Store one job per params in a few round trips; TypeError stores none of them."""
        return self._enqueue(task_name, list(params_list), waiter_timeout=None)

    def enqueue_wait(self, task_name: str, params: JobParams | None = None,
                     timeout: float = DEFAULT_WAIT_TIMEOUT) -> Job:
        """Enqueue a job and return it done; QueueWaitTimeoutError after ``timeout`` seconds.

        On a timeout the job keeps its place and runs later; the exception
        carries it in ``job``. A worker reporting the outcome learns
        (success() returns True) whether this caller received it.
        """
        job = self._enqueue(task_name, [params], waiter_timeout=timeout)[0]
        done = self._await_outcome(job, max(timeout, 0.0))
        if done is None:
            raise QueueWaitTimeoutError(job=job)
        return done

    def _enqueue(self, task_name: str, params_list: list[JobParams | None],
                 waiter_timeout: float | None) -> list[Job]:
        encoded = []
        for params in params_list:
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise TypeError(f"job params must be a dict, not {type(params).__name__}")
            encoded.append(_encode(params))
        if not encoded:
            return []
        stack = _enqueue_stack()
        stored = self._insert(task_name, encoded, stack, waiter_timeout)
        return [Job(self, job_id, task_name, json.loads(params), JobStatus(JOB_STATE_ENQUEUED, enqueued),
                    stack)
                for (job_id, enqueued), params in zip(stored, encoded)]

    # -- reading and deleting ------------------------------------------------

    def retrieve_job(self, job_id: str) -> Job:
        """Return the stored job; NoSuchJobError for an unknown or malformed id."""
        return self._decode(job_id, self._load(job_id))

    def list_jobs(self) -> list[Job]:
        """Return every stored job, oldest first."""
        return [self._decode(job_id, fields) for job_id, fields in self._list()]

    def delete_job(self, job_id: str) -> None:
        """Remove the job wherever it is; NoSuchJobError for an unknown id."""
        if not self._delete(job_id):
            raise NoSuchJobError()

    def reset_storage(self) -> None:
        """Erase every job of this queue; the queue stays usable."""
        self._reset()

    def close(self) -> None:
        """Stop the worker loop if one runs and release the server connections."""
        self.stop()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the worker ----------------------------------------------------------

    def process_loop(self) -> None:
        """Claim and run jobs on ``concurrency`` threads until stop() is called."""
        with self._loop_lock:
            if self._stopping is not None:
                raise RuntimeError("process_loop is already running on this queue")
            stopping = self._stopping = threading.Event()
            self._loop_done.clear()
        worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="monsterqueue")
        turns = itertools.count()
        try:
            while not stopping.is_set():
                free = self._wait_for_free_threads(stopping)
                names = list(self._tasks)
                if not free or not names:
                    stopping.wait(IDLE_WAKE_INTERVAL if not names else 0)
                    continue
                # Start at another task each time, so a backlog of one can't starve the others.
                turn = next(turns) % len(names)
                names = names[turn:] + names[:turn]
                for job_id, fields in self._claim(names, free, worker, IDLE_WAKE_INTERVAL):
                    with self._idle:
                        self._busy += 1
                    pool.submit(self._run, job_id, fields)
        finally:
            pool.shutdown(wait=True)
            with self._loop_lock:
                self._stopping = None
                self._loop_done.set()

    def stop(self) -> None:
        """End process_loop and wait for its running jobs; safe to call at any time."""
        with self._loop_lock:
            stopping = self._stopping
        if stopping is None:
            return
        stopping.set()
        with self._idle:
            self._idle.notify_all()
        self._interrupt_claim()
        self._loop_done.wait()

    def wait(self) -> None:
        """Wait until no job is running on this queue's worker threads."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0)

    def _wait_for_free_threads(self, stopping: threading.Event) -> int:
        with self._idle:
            self._idle.wait_for(lambda: self._busy < self.concurrency or stopping.is_set())
            return 0 if stopping.is_set() else self.concurrency - self._busy

    def _run(self, job_id: str, fields: dict[str, Any]) -> None:
        try:
            job = self._decode(job_id, fields)
        except MonsterQueueError as exc:
            logger.error("job %s can't be decoded: %s", job_id, exc)
            self._finish(Job(self, job_id, "", {}, JobStatus(JOB_STATE_RUNNING, None), "",
                             delivery=_delivery_of(fields)), result=None, error=str(exc))
            self._release_thread()
            return
        try:
            self._tasks[job.task_name].run(job)
        except BaseException as exc:  # a task must never take its worker down
            logger.exception("task %s failed on job %s", job.task_name, job.id)
            if not job._reported:
                job.error(exc)
        else:
            if not job._reported:
                job.error(NoJobResultSetError().args[0])
        finally:
            self._release_thread()

    def _release_thread(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    # -- decoding stored jobs ------------------------------------------------

    def _decode(self, job_id: str, fields: dict[str, Any]) -> Job:
        """Build a Job from a stored record; MalformedJobError says what is wrong with it.

        Every backend stores the same fields: task, params (JSON text), state,
        enqueued/started/done (milliseconds since the epoch), result (JSON
        text) or error (text), stack, and delivery (claims so far).
        """
        try:
            state = fields["state"]
            if state not in (JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE):
                raise ValueError(f"unknown state {state!r}")
            params = json.loads(fields["params"])
            if not isinstance(params, dict):
                raise ValueError("params are not a JSON object")
            result = fields.get("result")
            return Job(self, job_id, str(fields["task"]), params,
                       JobStatus(state, _time(fields.get("enqueued")), _time(fields.get("started")),
                                 _time(fields.get("done"))),
                       str(fields.get("stack", "")), delivery=_delivery_of(fields),
                       result=None if result is None else json.loads(result),
                       error=fields.get("error"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedJobError(f"job {job_id} is malformed: {_describe(exc)}") from None

    # -- storage primitives, supplied by each backend ------------------------

    @abc.abstractmethod
    def _insert(self, task_name: str, params: list[str], stack: str,
                waiter_timeout: float | None) -> list[tuple[str, datetime]]:
        """Store enqueued jobs, one per JSON params text, all or none; return (id, enqueued) each.

        ``waiter_timeout`` is set for enqueue_wait: mark the job as awaited.
        """

    @abc.abstractmethod
    def _claim(self, task_names: list[str], limit: int, worker: str,
               block: float) -> list[tuple[str, dict[str, Any]]]:
        """Atomically take up to ``limit`` enqueued jobs of these tasks, oldest first per task.

        Each taken job is running, with ``started``, ``worker`` and a new
        ``delivery`` recorded in the same step. With nothing to take, wait up
        to ``block`` seconds for new work. Return (id, stored fields) pairs.
        """

    @abc.abstractmethod
    def _finish(self, job: Job, *, result: str | None, error: str | None) -> bool | None:
        """Record the outcome if ``job`` still holds its delivery, and hand it to the waiter.

        Atomically: state done, done time, result or error, no longer held.
        Return True if an enqueue_wait caller was waiting (it gets the job),
        False if none was, None if the job is gone or held by another delivery.
        """

    @abc.abstractmethod
    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        """Wait up to ``timeout`` for the job's outcome and return the job done.

        On a timeout withdraw the waiter atomically, so that exactly one of
        this call and _finish wins: return None only if no outcome was handed.
        """

    @abc.abstractmethod
    def _interrupt_claim(self) -> None:
        """Wake this queue's worker if it is blocked in _claim, so stop() returns at once."""

    @abc.abstractmethod
    def _load(self, job_id: str) -> dict[str, Any]:
        """Return the stored fields of one job; raise NoSuchJobError."""

    @abc.abstractmethod
    def _list(self) -> list[tuple[str, dict[str, Any]]]:
        """Return (id, stored fields) of every job, oldest first."""

    @abc.abstractmethod
    def _delete(self, job_id: str) -> bool:
        """Remove the job and every reference to it; return False if there was none."""

    @abc.abstractmethod
    def _reset(self) -> None:
        """Remove every job and every structure of this queue."""


class MalformedJobError(MonsterQueueError):
    """A stored job can't be decoded; the message says what is wrong with it."""


# ---------------------------------------------------------------------------
# Shared machinery: encoding, times, the enqueue stack, backend dispatch
# ---------------------------------------------------------------------------

_json_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _encode(value: Any) -> str:
    """Encode a JSON-compatible value once; TypeError names what isn't compatible."""
    try:
        return _json_encoder.encode(value)
    except ValueError as exc:  # NaN and infinities, which JSON can't carry
        raise TypeError(str(exc)) from None
    except RecursionError:
        raise TypeError("value is nested too deeply or is circular") from None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _time(ms: Any) -> datetime | None:
    """Turn stored milliseconds since the epoch into an aware UTC datetime."""
    if ms is None or ms == "":
        return None
    return datetime.fromtimestamp(int(ms) / 1000, timezone.utc)


def _delivery_of(fields: dict[str, Any]) -> int:
    try:
        return int(fields.get("delivery") or 0)
    except (TypeError, ValueError):
        return 0


_THIS_FILE = os.path.normcase(__file__)


def _enqueue_stack() -> str:
    """Describe the caller's stack, innermost frames kept within STACK_TRACE_LIMIT.

    Only file, line and function are written: reading source lines (as the
    traceback module does) would cost more than the enqueue itself.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and os.path.normcase(frame.f_code.co_filename) == _THIS_FILE:
        frame = frame.f_back
    lines: list[str] = []
    size = 0
    while frame is not None:
        code = frame.f_code
        line = f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n'
        size += len(line)
        if size > STACK_TRACE_LIMIT:
            break
        lines.append(line)
        frame = frame.f_back
    return "".join(reversed(lines))


def _backend_for(url: str | None) -> type[Queue]:
    scheme = urlsplit(url or "").scheme
    backends: dict[str, type[Queue]] = {
        "memory": MemoryQueue, "redis": RedisQueue, "rediss": RedisQueue, "unix": RedisQueue,
        "mongodb": MongoQueue, "mongodb+srv": MongoQueue,
    }
    if scheme not in backends:
        raise ValueError(f"unsupported queue URL {url!r}: use one of "
                         + ", ".join(f"{name}://" for name in backends))
    return backends[scheme]


def _require(module: str, extra: str) -> Any:
    """Import a backend's driver, or say how to install it."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"this backend needs the {module!r} package: "
                          f"pip install monsterqueue[{extra}]") from exc


# ---------------------------------------------------------------------------
# MemoryQueue: in-process, for tests and the demo
# ---------------------------------------------------------------------------

class MemoryQueue(Queue):
    """A queue held in this process's memory, shared by its threads; nothing persists."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._changed = threading.Condition()          # guards everything below
        self._jobs: dict[str, dict[str, Any]] = {}     # id -> stored fields, insertion ordered
        self._ready: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self._ids = itertools.count(1)
        self._interrupted = False

    def _insert(self, task_name: str, params: list[str], stack: str,
                waiter_timeout: float | None) -> list[tuple[str, datetime]]:
        now = _now_ms()
        with self._changed:
            ids = [str(next(self._ids)) for _ in params]
            for job_id, text in zip(ids, params):
                self._jobs[job_id] = {"task": task_name, "params": text, "state": JOB_STATE_ENQUEUED,
                                      "enqueued": now, "stack": stack, "delivery": 0,
                                      "waiter": waiter_timeout is not None}
                self._ready[task_name].append(job_id)
            self._changed.notify_all()
        enqueued = _time(now)
        assert enqueued is not None
        return [(job_id, enqueued) for job_id in ids]

    def _claim(self, task_names: list[str], limit: int, worker: str,
               block: float) -> list[tuple[str, dict[str, Any]]]:
        with self._changed:
            if not any(self._ready.get(name) for name in task_names) and not self._interrupted:
                self._changed.wait(block)
            self._interrupted = False
            claimed: list[tuple[str, dict[str, Any]]] = []
            now = _now_ms()
            for name in task_names:
                ready = self._ready.get(name)
                while ready and len(claimed) < limit:
                    job_id = ready.popleft()
                    fields = self._jobs[job_id]
                    fields.update(state=JOB_STATE_RUNNING, started=now, worker=worker,
                                  delivery=fields["delivery"] + 1)
                    claimed.append((job_id, dict(fields)))
            return claimed

    def _finish(self, job: Job, *, result: str | None, error: str | None) -> bool | None:
        with self._changed:
            fields = self._jobs.get(job.id)
            if fields is None or fields["state"] != JOB_STATE_RUNNING or fields["delivery"] != job._delivery:
                return None
            fields.update(state=JOB_STATE_DONE, done=_now_ms(), result=result, error=error)
            fields.pop("worker", None)
            received = fields["waiter"]
            fields["waiter"] = False
            self._changed.notify_all()
            return received

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        with self._changed:
            fields = self._jobs.get(job.id)
            self._changed.wait_for(lambda: fields is None or fields["state"] == JOB_STATE_DONE, timeout)
            if fields is None or fields["waiter"]:
                if fields is not None:
                    fields["waiter"] = False
                return None
            return self._decode(job.id, dict(fields))

    def _interrupt_claim(self) -> None:
        with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    def _load(self, job_id: str) -> dict[str, Any]:
        with self._changed:
            if job_id not in self._jobs:
                raise NoSuchJobError()
            return dict(self._jobs[job_id])

    def _list(self) -> list[tuple[str, dict[str, Any]]]:
        with self._changed:
            return [(job_id, dict(fields)) for job_id, fields in self._jobs.items()]

    def _delete(self, job_id: str) -> bool:
        with self._changed:
            fields = self._jobs.pop(job_id, None)
            if fields is None:
                return False
            if fields["state"] == JOB_STATE_ENQUEUED:
                self._ready[fields["task"]].remove(job_id)
            self._changed.notify_all()
            return True

    def _reset(self) -> None:
        with self._changed:
            self._jobs.clear()
            self._ready.clear()
            self._changed.notify_all()


# ---------------------------------------------------------------------------
# RedisQueue
# ---------------------------------------------------------------------------
#
# Keys, all under one Redis Cluster hash tag so that every script touches one slot:
#
#   {prefix}:seq            counter that numbers the jobs
#   {prefix}:jobs           sorted set of every job id, scored by that number
#   {prefix}:job:ID         hash of the job's fields (see Queue._decode)
#   {prefix}:queue:TASK     list of enqueued ids of one task, FIFO
#   {prefix}:ready:TASK     sorted set with one member while that list is non-empty:
#                           idle workers block on it with BZPOPMIN
#   {prefix}:running        sorted set of claimed ids, scored by lease deadline
#   {prefix}:outcome:ID     list where an enqueue_wait caller BLPOPs the outcome
#   {prefix}:wake:WORKER    sorted set that stop() writes to wake its own worker
#
# Round trips per job: enqueue 1 (one script; enqueue_many is one per 1000
# jobs); claim 1 script per batch of up to the free threads, plus one BZPOPMIN
# when the queue is empty; finish 1 script, which also pushes the outcome to a
# waiter; enqueue_wait 1 BLPOP that receives the whole job, plus 1 script only
# when it times out.

# Numbers the jobs, stores them and marks their tasks ready, atomically, so a
# job is never visible half-written. KEYS: seq, jobs, queue:TASK, ready:TASK.
# ARGV: job key prefix, task, stack, waiter timeout in ms ('' for none), params...
_REDIS_ENQUEUE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = #ARGV - 4
local last = redis.call('INCRBY', KEYS[1], n)
local result = {now}
for i = 1, n do
  local id = tostring(last - n + i)
  redis.call('HSET', ARGV[1] .. id, 'task', ARGV[2], 'params', ARGV[4 + i], 'state', 'enqueued',
             'enqueued', now, 'stack', ARGV[3], 'delivery', 0)
  if ARGV[4] ~= '' then
    redis.call('HSET', ARGV[1] .. id, 'waiter', now + tonumber(ARGV[4]))
  end
  redis.call('ZADD', KEYS[2], last - n + i, id)
  redis.call('RPUSH', KEYS[3], id)
  result[i + 1] = id
end
redis.call('ZADD', KEYS[4], 0, 1)
return result
"""

# Pops ids and records the claim in one step, so no crash can lose a popped
# job: it is in the running set, with its lease deadline, or still queued.
# KEYS: running, then queue:TASK and ready:TASK for each task.
# ARGV: job key prefix, limit, worker, lease in ms.
_REDIS_CLAIM = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit = tonumber(ARGV[2])
local claimed = {}
for i = 2, #KEYS, 2 do
  while #claimed < limit do
    local id = redis.call('LPOP', KEYS[i])
    if not id then break end
    local key = ARGV[1] .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'state', 'running', 'started', now, 'worker', ARGV[3])
      redis.call('HINCRBY', key, 'delivery', 1)
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), id)
      claimed[#claimed + 1] = {id, redis.call('HGETALL', key)}
    end
  end
  if redis.call('LLEN', KEYS[i]) > 0 then
    redis.call('ZADD', KEYS[i + 1], 0, 1)
  else
    redis.call('DEL', KEYS[i + 1])
  end
end
return claimed
"""

# Records the outcome only for the delivery that holds the job, and hands the
# whole job to a waiting caller in the same step: the waiter flag flips once,
# here or in _REDIS_WITHDRAW, never both. KEYS: job:ID, running, outcome:ID.
# ARGV: id, delivery, 'result' or 'error', its text.
_REDIS_FINISH = """
local held = redis.call('HMGET', KEYS[1], 'state', 'delivery', 'waiter')
if held[1] ~= 'running' or held[2] ~= ARGV[2] then return -1 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'state', 'done', 'done', now, ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('ZREM', KEYS[2], ARGV[1])
local deadline = tonumber(held[3])
if not deadline or deadline == 0 then return 0 end
redis.call('HSET', KEYS[1], 'waiter', 0)
redis.call('RPUSH', KEYS[3], cjson.encode(redis.call('HGETALL', KEYS[1])))
-- The waiter pops it at once; the expiry only bounds a waiter that died.
redis.call('PEXPIRE', KEYS[3], math.max(deadline - now, 0) + 60000)
return 1
"""

# Withdraws a waiter that timed out, unless the outcome was handed first: then
# returns it. KEYS: job:ID, outcome:ID.
_REDIS_WITHDRAW = """
local waiter = tonumber(redis.call('HGET', KEYS[1], 'waiter'))
if waiter and waiter ~= 0 then
  redis.call('HSET', KEYS[1], 'waiter', 0)
  return false
end
local outcome = redis.call('LPOP', KEYS[2])
redis.call('DEL', KEYS[2])
return outcome
"""

# Removes the job from every structure that names it. KEYS: job:ID, jobs,
# running, outcome:ID. ARGV: id, queue key prefix.
_REDIS_DELETE = """
local task = redis.call('HGET', KEYS[1], 'task')
if not task then return 0 end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('LREM', ARGV[2] .. task, 1, ARGV[1])
return 1
"""


class RedisQueue(Queue):
    """A queue stored in Redis (or Valkey, or a Redis Cluster), for many workers."""

    def __init__(self, url: str | None = None, *, client: Any = None,
                 key_prefix: str = "monsterqueue", lease_timeout: float = 30.0,
                 **options: Any) -> None:
        super().__init__(**options)
        if client is None:
            redis = _require("redis", "redis")
            client = redis.Redis.from_url(url or "redis://localhost:6379/0", decode_responses=True)
        self.client = client
        self.lease_timeout = lease_timeout
        self._prefix = "{" + key_prefix + "}:"
        self._worker = ""
        self._enqueue_script = client.register_script(_REDIS_ENQUEUE)
        self._claim_script = client.register_script(_REDIS_CLAIM)
        self._finish_script = client.register_script(_REDIS_FINISH)
        self._withdraw_script = client.register_script(_REDIS_WITHDRAW)
        self._delete_script = client.register_script(_REDIS_DELETE)

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _insert(self, task_name: str, params: list[str], stack: str,
                waiter_timeout: float | None) -> list[tuple[str, datetime]]:
        keys = [self._key("seq"), self._key("jobs"), self._key("queue", task_name),
                self._key("ready", task_name)]
        waiter = "" if waiter_timeout is None else str(int(waiter_timeout * 1000))
        stored = []
        # Batches stay well below Lua's limits on arguments and stack.
        for start in range(0, len(params), 1000):
            now, *ids = self._enqueue_script(
                keys, [self._key("job", ""), task_name, stack, waiter, *params[start:start + 1000]])
            enqueued = _time(now)
            stored += [(_text(job_id), enqueued) for job_id in ids]
        return stored  # type: ignore[return-value]

    def _claim(self, task_names: list[str], limit: int, worker: str,
               block: float) -> list[tuple[str, dict[str, Any]]]:
        self._worker = worker
        keys = [self._key("running")]
        for name in task_names:
            keys += [self._key("queue", name), self._key("ready", name)]
        args = [self._key("job", ""), limit, worker, int(self.lease_timeout * 1000)]
        claimed = self._claim_script(keys, args)
        if not claimed:
            wake = self._key("wake", worker)
            self.client.bzpopmin([*keys[2::2], wake], block)
            claimed = self._claim_script(keys, args)
        return [(_text(job_id), _pairs(fields)) for job_id, fields in claimed]

    def _finish(self, job: Job, *, result: str | None, error: str | None) -> bool | None:
        outcome = ("result", result) if error is None else ("error", error)
        received = self._finish_script(
            [self._key("job", job.id), self._key("running"), self._key("outcome", job.id)],
            [job.id, job._delivery, *outcome])
        return None if received == -1 else received == 1

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        outcome_key = self._key("outcome", job.id)
        popped = self.client.blpop([outcome_key], timeout) if timeout >= 0.001 else None
        payload = popped[1] if popped else self._withdraw_script(
            [self._key("job", job.id), outcome_key])
        return None if payload is None else self._decode(job.id, _pairs(json.loads(payload)))

    def _interrupt_claim(self) -> None:
        if self._worker:
            wake = self._key("wake", self._worker)
            self.client.pipeline().zadd(wake, {"stop": 0}).expire(wake, 60).execute()

    def _load(self, job_id: str) -> dict[str, Any]:
        fields = self.client.hgetall(self._key("job", job_id))
        if not fields:
            raise NoSuchJobError()
        return _pairs(fields)

    def _list(self) -> list[tuple[str, dict[str, Any]]]:
        ids = [_text(job_id) for job_id in self.client.zrange(self._key("jobs"), 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id))
        return [(job_id, _pairs(fields)) for job_id, fields in zip(ids, pipe.execute()) if fields]

    def _delete(self, job_id: str) -> bool:
        return self._delete_script(
            [self._key("job", job_id), self._key("jobs"), self._key("running"),
             self._key("outcome", job_id)],
            [job_id, self._key("queue", "")]) == 1

    def _reset(self) -> None:
        keys = list(self.client.scan_iter(match=self._prefix.replace("{", "\\{").replace("}", "\\}") + "*",
                                          count=1000))
        for start in range(0, len(keys), 1000):
            self.client.delete(*keys[start:start + 1000])

    def close(self) -> None:
        super().close()
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(fields: Any) -> dict[str, Any]:
    """Turn a hash, as a dict or as Lua's flat [field, value, ...] list, into text fields."""
    if isinstance(fields, dict):
        return {_text(k): _text(v) for k, v in fields.items()}
    return {_text(fields[i]): _text(fields[i + 1]) for i in range(0, len(fields), 2)}


# ---------------------------------------------------------------------------
# MongoQueue
# ---------------------------------------------------------------------------
#
# One collection, COLLECTION_PREFIX_jobs, one document per job: the fields of
# Queue._decode, with BSON dates for the times, plus ``waiter`` (an
# enqueue_wait caller is waiting) and ``worker`` (who holds it while running).
# The index (state, task, _id) serves the claim: equality on state, $in on the
# task names, oldest first.
#
# Round trips per job: enqueue 1 (insert_many for enqueue_many); claim 1
# find_one_and_update per job; finish 1 find_one_and_update, which also flips
# the waiter flag; enqueue_wait polls with find_one, from 5 ms backing off to
# ``poll_interval``, plus 1 update only when it times out. Idle workers poll
# every ``poll_interval``: a standalone server has no way to push.

class MongoQueue(Queue):
    """A queue stored in a MongoDB collection, for many workers."""

    def __init__(self, url: str | None = None, *, database: str | None = None,
                 collection_prefix: str = "monsterqueue", client: Any = None,
                 poll_interval: float = 0.1, lease_timeout: float = 30.0,
                 **options: Any) -> None:
        super().__init__(**options)
        pymongo = _require("pymongo", "mongo")
        if client is None:
            client = pymongo.MongoClient(url or "mongodb://localhost:27017", tz_aware=True)
        database = database or (url and pymongo.uri_parser.parse_uri(url)["database"])
        if not database:
            raise ValueError("MongoQueue needs a database: name it in the URL "
                             "(mongodb://host/dbname) or pass database=...")
        self.client = client
        self.poll_interval = poll_interval
        self.lease_timeout = lease_timeout
        self._bson = _require("bson", "mongo")
        self._after = pymongo.ReturnDocument.AFTER
        self._jobs = client[database][f"{collection_prefix}_jobs"]
        self._jobs.create_index([("state", 1), ("task", 1), ("_id", 1)], name="claim")
        self._wakeup = threading.Event()

    def _insert(self, task_name: str, params: list[str], stack: str,
                waiter_timeout: float | None) -> list[tuple[str, datetime]]:
        now = _utc_now()
        docs = [{"task": task_name, "params": text, "state": JOB_STATE_ENQUEUED, "enqueued": now,
                 "stack": stack, "delivery": 0, "waiter": waiter_timeout is not None}
                for text in params]
        ids = self._jobs.insert_many(docs).inserted_ids
        return [(str(job_id), now) for job_id in ids]

    def _claim(self, task_names: list[str], limit: int, worker: str,
               block: float) -> list[tuple[str, dict[str, Any]]]:
        claimed = self._claim_now(task_names, limit, worker)
        if not claimed and not self._wakeup.wait(min(block, self.poll_interval)):
            claimed = self._claim_now(task_names, limit, worker)
        self._wakeup.clear()
        return claimed

    def _claim_now(self, task_names: list[str], limit: int,
                   worker: str) -> list[tuple[str, dict[str, Any]]]:
        claimed = []
        while len(claimed) < limit:
            doc = self._jobs.find_one_and_update(
                {"state": JOB_STATE_ENQUEUED, "task": {"$in": task_names}},
                {"$set": {"state": JOB_STATE_RUNNING, "started": _utc_now(), "worker": worker},
                 "$inc": {"delivery": 1}},
                sort=[("_id", 1)], return_document=self._after)
            if doc is None:
                break
            claimed.append((str(doc["_id"]), _mongo_fields(doc)))
        return claimed

    def _finish(self, job: Job, *, result: str | None, error: str | None) -> bool | None:
        before = self._jobs.find_one_and_update(
            {"_id": self._bson.ObjectId(job.id), "state": JOB_STATE_RUNNING, "delivery": job._delivery},
            {"$set": {"state": JOB_STATE_DONE, "done": _utc_now(), "result": result, "error": error,
                      "waiter": False},
             "$unset": {"worker": ""}},
            projection={"waiter": True})
        return None if before is None else bool(before.get("waiter"))

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            doc = self._jobs.find_one({"_id": self._bson.ObjectId(job.id)})
            if doc is not None and doc["state"] == JOB_STATE_DONE and not doc.get("waiter"):
                return self._decode(job.id, _mongo_fields(doc))
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, self.poll_interval)
        withdrawn = self._jobs.update_one({"_id": self._bson.ObjectId(job.id), "waiter": True},
                                          {"$set": {"waiter": False}})
        if withdrawn.modified_count or doc is None:
            return None
        return self._decode(job.id, self._load(job.id))

    def _interrupt_claim(self) -> None:
        self._wakeup.set()

    def _object_id(self, job_id: str) -> Any:
        if not self._bson.ObjectId.is_valid(job_id):
            raise NoSuchJobError()
        return self._bson.ObjectId(job_id)

    def _load(self, job_id: str) -> dict[str, Any]:
        doc = self._jobs.find_one({"_id": self._object_id(job_id)})
        if doc is None:
            raise NoSuchJobError()
        return _mongo_fields(doc)

    def _list(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(doc["_id"]), _mongo_fields(doc))
                for doc in self._jobs.find().sort([("enqueued", 1), ("_id", 1)])]

    def _delete(self, job_id: str) -> bool:
        try:
            return bool(self._jobs.delete_one({"_id": self._object_id(job_id)}).deleted_count)
        except NoSuchJobError:
            return False

    def _reset(self) -> None:
        self._jobs.delete_many({})

    def close(self) -> None:
        super().close()
        self.client.close()


def _utc_now() -> datetime:
    """Now in UTC, cut to the milliseconds that BSON dates keep."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _mongo_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """Turn a job document into Queue._decode's fields: BSON dates become milliseconds."""
    return {key: round(value.timestamp() * 1000) if isinstance(value, datetime) else value
            for key, value in doc.items() if value is not None}

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
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import hmac
import importlib
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import types
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, NamedTuple, Union
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_TIME_LIMIT",
    "JOB_STATE_DEFERRED",
    "JOB_STATE_DONE",
    "JOB_STATE_ENQUEUED",
    "JOB_STATE_RUNNING",
    "STACK_TRACE_LIMIT",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobParams",
    "JobResult",
    "JobStatus",
    "MalformedJobError",
    "MemoryQueue",
    "MongoQueue",
    "MonsterQueueError",
    "NoJobResultError",
    "NoJobResultSetError",
    "NoSuchJobError",
    "OutcomeUnknownError",
    "Queue",
    "QueueWaitTimeoutError",
    "RedisQueue",
    "ServerUnavailableError",
    "Task",
    "TimeLimitExceeded",
]

logger = logging.getLogger("monsterqueue")
logger.addHandler(logging.NullHandler())


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# The states a job moves through, in order: deferred only while it has dependencies to wait for.
JOB_STATE_DEFERRED = "deferred"
JOB_STATE_ENQUEUED = "enqueued"
JOB_STATE_RUNNING = "running"
JOB_STATE_DONE = "done"

# Bytes of the enqueuing caller's stack kept on each job, innermost frames first,
# and of the traceback of a failed attempt, innermost frames and the error kept.
STACK_TRACE_LIMIT = 2048
TRACEBACK_LIMIT = 8192

# The error recorded for a task that returned without reporting; result() raises
# NoJobResultSetError for it.
NO_RESULT_SET = "task didn't set job result"

# How the error of a cancelled job starts; result() raises JobCancelledError for it.
# Every backend records these texts, and the Redis scripts are built with them.
CANCELLED = "cancelled"
CANCELLED_BEFORE_IT_RAN = f"{CANCELLED} before it ran"
CANCELLED_WHILE_RUNNING = f"{CANCELLED} while running"
# Filled with the dependency's id and how it ended: failed, cancelled, expired or deleted.
DEPENDENCY_ENDED = f"{CANCELLED}: dependency %s %s"

# The error of a poison job, whose leases ran out max_deliveries times: it kills its
# workers, and must not loop forever. Filled with its deliveries and its lost leases.
POISON_ERROR = "delivered %d times without finishing: its worker died or lost its lease %d times"

# How a done job ended: job.status.outcome, stored with the outcome.
OUTCOMES = ("succeeded", "failed", "cancelled", "expired")

# A worker is listed alive while its last heartbeat is less than this many leases old.
WORKER_ALIVE_LEASES = 3

# What a job made enqueued again from done (retry_job, retry_jobs) no longer has.
REQUEUE_CLEARS = ("done", "outcome", "result", "error", "lost", "traceback", "progress", "cancel")

# Defaults of the Queue options.
DEFAULT_CONCURRENCY = 8         # worker threads per process_loop
DEFAULT_WAIT_TIMEOUT = 30.0     # seconds enqueue_wait waits for a result
DEFAULT_LEASE_TIMEOUT = 30.0    # seconds a claimed job stays held without a heartbeat
DEFAULT_MAX_DELIVERIES = 5      # lost leases before a job is failed as poison
DEFAULT_CONNECT_TIMEOUT = 5.0   # seconds to reach a server before ServerUnavailableError
DEFAULT_RESULT_TTL = 86400.0    # seconds a done job is kept; None keeps it
DEFAULT_TIME_LIMIT = 600.0      # seconds a run may take, like Dramatiq's ten minutes; None: no limit
DEFAULT_ASYNC_CONCURRENCY = 100 # coroutines of async def tasks a worker runs at once, beside its threads

# How an idle worker waits: it wakes at least this often even if nothing is
# pushed, and backs off up to the longest pause while its server is away.
IDLE_WAKE_INTERVAL = 1.0
CLAIM_LINGER = 0.002            # seconds the loop waits for more free threads to claim for
OUTAGE_PAUSES = (0.1, 5.0)

# How often a MongoDB queue re-reads the server's clock, whose time its leases and
# due times are in: clocks drift apart slowly, and are stepped seldom.
CLOCK_CHECK_INTERVAL = 60.0

# A worker's event loop that hasn't run its own check for this long is blocked by
# a coroutine calling blocking code: the worker logs which job it is running.
LOOP_BLOCKED_WARNING = 0.5

# A running job's progress reaches the server at most this often, whatever the
# rate at which its task sets it; its last value is stored with the outcome.
PROGRESS_INTERVAL = 1.0

# Bulk retry and delete change at most this many jobs per server call, so that
# no call holds a single-threaded server for long.
BULK_BATCH = 500

# The upper bounds, in seconds, of the buckets of the run-time and queue-wait
# histograms that the finish step keeps per task (the last bucket is +Inf).
HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
_BUCKETS_MS = [round(bound * 1000) for bound in HISTOGRAM_BUCKETS]

# enqueue's default time_limit: the task's own applies.
_TASKS_OWN: Any = object()


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

    def __init__(self, message: str = NO_RESULT_SET) -> None:
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


class JobCancelledError(JobError):
    """The job was cancelled with Queue.cancel_job; raised inside a running task to stop it."""


class TimeLimitExceeded(MonsterQueueError):
    """Raised inside a task that ran past its time limit; the job is recorded as failed."""


class MalformedJobError(MonsterQueueError):
    """A stored job can't be decoded; the message says what is wrong with it."""


class ServerUnavailableError(MonsterQueueError, ConnectionError):
    """The queue's server can't be reached; the message names its address.

    Nothing was stored: the request never reached the server, or the server
    refused it (a Redis still loading its data).
    """


class OutcomeUnknownError(ServerUnavailableError):
    """A request reached the queue's server but its answer never came back.

    It may have been carried out: an enqueue retried after this error may
    store the job twice.
    """


# ---------------------------------------------------------------------------
# The contract: JobStatus, Task, Job, Queue
# ---------------------------------------------------------------------------

JobParams = dict[str, Any]
JobResult = Any
# What depends_on takes: a job or its id, or several of them.
Dependencies = Union["Job", str, Iterable[Union["Job", str]], None]
# What a backend's _stats returns: see Queue._stats.
_Stats = tuple[list[tuple[str, Any]], list[tuple[str, Any, Any]], list[int], list[tuple[str, Any]], list[str]]


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """Where a job is in its life, with timezone-aware UTC times.

    ``attempt`` counts runs made by retries (1 until the first retry);
    ``scheduled`` is when a delayed or retried job becomes due; ``outcome``
    is None until the job is done, then one of OUTCOMES: "succeeded",
    "failed" (an error, a time limit, a malformed record, a poison job) or
    "cancelled".
    """

    state: str
    enqueued: datetime | None
    started: datetime | None = None
    done: datetime | None = None
    attempt: int = 1
    scheduled: datetime | None = None
    outcome: str | None = None


class Task(abc.ABC):
    """A unit of work, registered on a Queue under its ``name``.

    A task that raises or reports an error runs again up to ``max_retries``
    times, ``retry_delay`` seconds after its first failure, doubling each time.
    A run that takes longer than ``time_limit`` seconds (None: no limit) is
    interrupted with TimeLimitExceeded and recorded as failed. ``priority``
    (-100..100, higher first) is its jobs' default where this task is registered.
    """

    name: str
    max_retries: int = 0
    retry_delay: float = 1.0
    time_limit: float | None = DEFAULT_TIME_LIMIT
    priority: int = 0

    @abc.abstractmethod
    def run(self, job: Job) -> None:
        """Do the job's work and report it with job.success() or job.error()."""


class FunctionTask(Task):
    """A task made by @queue.task from a function of the job's params, and the handle that
    decorator returns: called, it runs the function here (in tests, say); its enqueue
    methods enqueue jobs of it on the queue it is registered on, the params bound to the
    function's signature (TypeError, and nothing stored, for a missing or unknown one)."""

    def __init__(self, name: str, function: Callable[..., Any], max_retries: int = 0,
                 retry_delay: float = 1.0, time_limit: float | None = DEFAULT_TIME_LIMIT,
                 priority: int = 0) -> None:
        self.name = name
        self.function = function
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.time_limit = time_limit
        self.priority = _check_priority(priority)
        self.queue: Queue | None = None  # the queue it was registered on last
        self._signature: Any = None

    def run(self, job: Job) -> None:
        job.success(self.function(**job.params))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def options(self, **options: Any) -> _TaskOptions:
        """This task with enqueue options for its enqueue methods: any of Queue.enqueue's and
        enqueue_wait's, ``timeout`` mattering to the waits only."""
        return _TaskOptions(self, options)

    def enqueue(self, *args: Any, **kwargs: Any) -> Job:
        """Queue.enqueue() a job of this task with these params, by position or keyword."""
        return self.options().enqueue(*args, **kwargs)

    def enqueue_many(self, params_list: Iterable[JobParams]) -> list[Job]:
        """Queue.enqueue_many() jobs of this task, one per dict of params."""
        return self.options().enqueue_many(params_list)

    def enqueue_wait(self, *args: Any, **kwargs: Any) -> Job:
        """Queue.enqueue_wait() a job of this task with these params."""
        return self.options().enqueue_wait(*args, **kwargs)

    async def aenqueue(self, *args: Any, **kwargs: Any) -> Job:
        """Queue.aenqueue() a job of this task with these params."""
        return await self.options().aenqueue(*args, **kwargs)

    async def aenqueue_many(self, params_list: Iterable[JobParams]) -> list[Job]:
        """Queue.aenqueue_many() jobs of this task, one per dict of params."""
        return await self.options().aenqueue_many(params_list)

    async def aenqueue_wait(self, *args: Any, **kwargs: Any) -> Job:
        """Queue.aenqueue_wait() a job of this task with these params."""
        return await self.options().aenqueue_wait(*args, **kwargs)

    def _params(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> JobParams:
        """A call's arguments as a job's params, by the function's parameter names."""
        import inspect

        if self._signature is None:
            self._signature = inspect.signature(self.function)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r}: {exc}") from None
        params: JobParams = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                params.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"task {self.name!r} takes *{name}: a job's params are named")
            else:
                params[name] = value
        return params


class _TaskOptions:
    """A task handle with enqueue options: what FunctionTask.options returns."""

    def __init__(self, task: FunctionTask, options: dict[str, Any]) -> None:
        self._task, self._options = task, options

    def _queue(self, waits: bool) -> tuple[Queue, dict[str, Any]]:
        if self._task.queue is None:
            raise TypeError(f"task {self._task.name!r} is registered on no queue")
        options = dict(self._options)
        if not waits:
            options.pop("timeout", None)
        return self._task.queue, options

    def enqueue(self, *args: Any, **kwargs: Any) -> Job:
        queue, options = self._queue(False)
        return queue.enqueue(self._task.name, self._task._params(args, kwargs), **options)

    def enqueue_many(self, params_list: Iterable[JobParams]) -> list[Job]:
        queue, options = self._queue(False)
        return queue.enqueue_many(self._task.name, [self._task._params((), params) for params in params_list],
                                  **options)

    def enqueue_wait(self, *args: Any, **kwargs: Any) -> Job:
        queue, options = self._queue(True)
        return queue.enqueue_wait(self._task.name, self._task._params(args, kwargs), **options)

    async def aenqueue(self, *args: Any, **kwargs: Any) -> Job:
        queue, options = self._queue(False)
        return await queue.aenqueue(self._task.name, self._task._params(args, kwargs), **options)

    async def aenqueue_many(self, params_list: Iterable[JobParams]) -> list[Job]:
        queue, options = self._queue(False)
        return await queue.aenqueue_many(
            self._task.name, [self._task._params((), params) for params in params_list], **options)

    async def aenqueue_wait(self, *args: Any, **kwargs: Any) -> Job:
        queue, options = self._queue(True)
        return await queue.aenqueue_wait(self._task.name, self._task._params(args, kwargs), **options)


class AsyncFunctionTask(FunctionTask):
    """A task made by @queue.task from an ``async def`` function: it runs on the worker's event loop."""

    async def run(self, job: Job) -> None:  # type: ignore[override]
        job.success(await self.function(**job.params))


class Job:
    """One enqueued call of a task: its params, status and outcome."""

    def __init__(self, queue: Queue, job_id: str, task_name: str, params: JobParams,
                 status: JobStatus, enqueue_stack: str, *, delivery: int = 0,
                 result: JobResult = None, error: str | None = None, progress: Any = None,
                 traceback: str | None = None, time_limit: float | None = None, priority: int = 0,
                 unique_key: str | None = None, dependency_ids: Iterable[str] | None = None) -> None:
        self._queue = queue
        self._id = job_id
        self._task_name = task_name
        self._params = params
        self._status = status
        self._enqueue_stack = enqueue_stack
        self._delivery = delivery        # which claim of the job this object holds
        self._result = result
        self._error = error
        self._progress = progress
        self._progress_text: str | None = None   # set_progress's last value, as stored
        self._traceback = traceback
        self._time_limit = time_limit    # the job's own limit (0: none); None: its task's
        self._priority = priority
        self._unique_key = unique_key
        self._dependency_ids = tuple(dependency_ids or ())  # no list per job: enqueue_many makes thousands
        self._run: _Run | None = None    # set while a worker runs this delivery of it

    id = property(lambda self: self._id, doc="The job's id, unique in its queue.")
    task_name = property(lambda self: self._task_name, doc="The name of the task that runs it.")
    params = property(lambda self: self._params, doc="The params it was enqueued with.")
    queue = property(lambda self: self._queue, doc="The queue it belongs to.")
    status = property(lambda self: self._status, doc="Its JobStatus when this object was read.")
    enqueue_stack = property(lambda self: self._enqueue_stack,
                             doc="The enqueuing caller's stack, innermost frames kept.")
    progress = property(lambda self: self._progress,
                        doc="The last value given to set_progress, or None.")
    traceback = property(lambda self: self._traceback,
                         doc="The traceback of the exception that failed the last attempt, or None.")
    priority = property(lambda self: self._priority, doc="Its priority, -100..100: higher runs first.")
    unique_key = property(lambda self: self._unique_key,
                          doc="The key no other unfinished job of its task may hold, or None.")
    dependency_ids = property(lambda self: list(self._dependency_ids),
                              doc="The ids of the jobs it depends on, in the order given; [] for none.")

    def fetch_dependencies(self) -> list[Job]:
        """Load the jobs it depends on, in that order: a fan-in reads their results.
        NoSuchJobError for one deleted since."""
        return [self._queue.retrieve_job(job_id) for job_id in self._dependency_ids]

    async def afetch_dependencies(self) -> list[Job]:
        """fetch_dependencies(), for code on an event loop."""
        return [await self._queue.aretrieve_job(job_id) for job_id in self._dependency_ids]

    def success(self, result: JobResult = None) -> bool:
        """Record ``result`` (JSON-compatible); return True if a waiter received it."""
        try:
            encoded = _encode(result)
        except TypeError as exc:
            # Not retried: the task would return the same thing again.
            return self._report(None, f"result is not JSON-compatible: {exc}", retryable=False)
        return self._report(encoded, None)

    def error(self, err: BaseException | str) -> bool:
        """Record ``err`` as the job's error (or retry); return True if a waiter received it.

        An exception's traceback is kept too, in ``traceback``.
        """
        if isinstance(err, str):
            return self._report(None, err)
        return self._report(None, _describe(err), traceback=_traceback_of(err))

    def set_progress(self, value: Any) -> None:
        """Record how far the running job got: any JSON value; TypeError if it isn't one.

        Call it as often as you like: the server gets the latest value about
        once a second, and the last one with the outcome.
        """
        self._progress_text = _encode(value)
        self._progress = value

    def result(self) -> JobResult:
        """Return the result; raise NoJobResultError, NoJobResultSetError, JobCancelledError or JobError."""
        if self._status.state != JOB_STATE_DONE:
            raise NoJobResultError()
        if self._error == NO_RESULT_SET:
            raise NoJobResultSetError()
        if self._error is not None:
            raise (JobCancelledError if self._error.startswith(CANCELLED) else JobError)(self._error)
        return self._result

    def as_dict(self) -> dict[str, Any]:
        """Return the job as JSON-compatible data, times in ISO 8601: what the CLI and web show."""
        status = self._status
        return {"id": self._id, "task": self._task_name, "params": self._params, "state": status.state,
                "outcome": status.outcome,
                "enqueued": _iso(status.enqueued), "started": _iso(status.started),
                "done": _iso(status.done), "scheduled": _iso(status.scheduled),
                "attempt": status.attempt, "result": self._result, "error": self._error,
                "progress": self._progress, "traceback": self._traceback, "priority": self._priority,
                "unique_key": self._unique_key, "dependency_ids": self.dependency_ids,
                "stack": self._enqueue_stack}

    def _report(self, result: str | None, error: str | None, retryable: bool = True,
                traceback: str | None = None) -> bool:
        if self._run is not None and not self._run.report():
            return False  # the worker interrupted it and recorded its outcome, or it reported already
        return self._queue._report(self, result, error, retryable, traceback)

    def __repr__(self) -> str:
        return f"<Job {self._id} {self._task_name} {self._status.state}>"


class Queue:
    """A job queue; ``Queue(url)`` builds the backend the URL names.

    Everything that is the same on every backend lives here: the task
    registry, validation and encoding, the enqueue stack, retries, the worker
    threads, leases' heartbeat, riding out server outages and the shape of
    waiting. A backend supplies the storage primitives at the end of this
    class, each atomic on its server.
    """

    _server_errors: tuple[type[BaseException], ...] = ()   # the driver's "can't reach it"
    _address = "memory"                                      # where the server is, for messages

    def __new__(cls, url: str | None = None, **options: Any) -> Queue:
        if cls is Queue:
            cls = _backend_for(url)
        return super().__new__(cls)

    def __init__(self, url: str | None = None, *, concurrency: int = DEFAULT_CONCURRENCY,
                 async_concurrency: int = DEFAULT_ASYNC_CONCURRENCY,
                 lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
                 max_deliveries: int = DEFAULT_MAX_DELIVERIES,
                 result_ttl: float | None = DEFAULT_RESULT_TTL, **options: Any) -> None:
        # Each backend takes its own options and passes the rest on: what arrives here is unknown.
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected options: {', '.join(options)}")
        if concurrency < 1 or async_concurrency < 1 or lease_timeout <= 0 or max_deliveries < 1:
            raise ValueError("concurrency, async_concurrency, lease_timeout and max_deliveries must be "
                             "positive")
        self.concurrency = concurrency
        self.async_concurrency = async_concurrency
        self.lease_timeout = lease_timeout
        self.max_deliveries = max_deliveries
        self.result_ttl = result_ttl
        self._tasks: dict[str, Task] = {}
        self._async_tasks: set[str] = set()       # the names of the tasks whose run is async def
        self._schedules: dict[str, _Schedule] = {}
        # Reentrant: stop() may run in a signal handler on a thread that holds it.
        self._worker_lock = threading.RLock()     # guards _worker
        self._worker: _Worker | None = None       # the runtime of the process_loop running now
        # Event loop -> the asyncio client of the server the a* methods use on it.
        self._aclients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._outage = _Outage(self)
        self._server = _ServerGuard(self)  # with self._server: a call to the server

    # -- tasks ---------------------------------------------------------------

    def register_task(self, task: Task | type[Task]) -> None:
        """Make ``task`` runnable by this queue's workers: a Task, or a Task subclass that can be
        built with no arguments. TypeError for anything else; ValueError for a duplicate or
        empty name, a priority out of -100..100 or a time_limit that isn't a positive number."""
        if isinstance(task, type) and issubclass(task, Task):
            kind = task
            try:
                task = kind()
            except TypeError as exc:
                raise TypeError(f"{kind.__name__} can't be built with no arguments ({exc}): register an "
                                "instance") from None
        if not isinstance(task, Task):
            raise TypeError(f"register_task takes a Task or a Task subclass, not {task!r}")
        _check_task_name(getattr(task, "name", None))
        _check_priority(task.priority)
        _check_time_limit(task.time_limit)
        if task.name in self._tasks:
            raise ValueError(f"task {task.name!r} is already registered")
        if isinstance(task, FunctionTask):
            task.queue = self
        self._tasks[task.name] = task
        if _is_coroutine_function(task.run):
            self._async_tasks.add(task.name)

    def task(self, name: str | Callable[..., Any] | None = None, *, max_retries: int = 0,
             retry_delay: float = 1.0, time_limit: float | None = DEFAULT_TIME_LIMIT,
             priority: int = 0) -> Any:
        """Register a function(**params) -> result as a task: ``@q.task()`` or ``@q.task("name")``.

        Returning records the value as the result; raising records the error,
        or retries up to ``max_retries`` times with exponential backoff. A run
        longer than ``time_limit`` seconds is interrupted (None: no limit).
        ``priority`` is its jobs' default (see enqueue).
        """
        _check_time_limit(time_limit)
        _check_priority(priority)

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            if isinstance(function, type):
                raise TypeError(f"@queue.task makes tasks of functions: register the class "
                                f"{function.__name__} with queue.register_task")
            kind = AsyncFunctionTask if _is_coroutine_function(function) else FunctionTask
            handle = kind(name if isinstance(name, str) else function.__name__, function, max_retries,
                          retry_delay, time_limit, priority)
            self.register_task(handle)
            return handle
        return register(name) if callable(name) else register

    def periodic(self, cron: str | None = None, *, every: float | None = None,
                 params: JobParams | None = None, name: str | None = None, unique_key: str | None = None,
                 **task_options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a function as a task (named after it) and schedule it, as schedule() does:
        ``@q.periodic("0 3 * * *")`` or ``@q.periodic(every=30.0)``; ValueError for a malformed
        schedule. ``task_options`` are task()'s."""
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            task_name = function.__name__
            schedule = _Schedule(name or task_name, task_name, cron, every, params, unique_key)
            handle = self.task(task_name, **task_options)(function)
            self._add_schedule(schedule)
            return handle
        return register

    def schedule(self, task_name: str, cron: str | None = None, *, every: float | None = None,
                 params: JobParams | None = None, name: str | None = None,
                 unique_key: str | None = None) -> None:
        """Enqueue a job of a registered task at every tick of ``cron`` (5 fields, in UTC) or of
        ``every`` seconds, with ``params``; ValueError for an unregistered task, a malformed
        schedule, neither or both of cron and every, or a schedule ``name`` (the task's name by
        default) taken.

        The workers of this queue fire it, no other process: each tick enqueues exactly one
        job however many workers run, decided on the server. A tick that falls while no
        worker runs is skipped, and logged. With ``unique_key`` a tick whose previous job
        hasn't finished enqueues nothing more.
        """
        if task_name not in self._tasks:
            raise ValueError(f"task {task_name!r} isn't registered: register it before scheduling it")
        self._add_schedule(_Schedule(name or task_name, task_name, cron, every, params, unique_key))

    def _add_schedule(self, schedule: _Schedule) -> None:
        if schedule.name in self._schedules:
            raise ValueError(f"a schedule named {schedule.name!r} is already registered")
        self._schedules[schedule.name] = schedule

    # -- producing -----------------------------------------------------------

    def enqueue(self, task_name: str | Task | Callable[..., Any], params: JobParams | None = None, *,
                delay: float | None = None, eta: datetime | None = None,
                time_limit: float | object | None = _TASKS_OWN, priority: int | None = None,
                unique_key: str | None = None, depends_on: Dependencies = None,
                allow_failure: bool = False) -> Job:
        """Store a job for ``task_name``; TypeError (nothing stored) if params aren't JSON.

        The task is named, or given by the handle @queue.task returned (whose
        own enqueue methods take its params by position or keyword).

        With ``delay`` (seconds) or ``eta`` (an aware datetime) it starts no
        sooner. ``time_limit`` (seconds, None for none) overrides the task's.
        ``priority`` (an int, -100..100; the task's where it is registered
        here, else 0) orders the jobs a worker takes: higher first, FIFO among
        equals. While a job of this task with ``unique_key`` isn't done, that
        job is returned and nothing is stored. A server that took the request
        but never answered raises OutcomeUnknownError: the job may be stored,
        and a unique_key makes the retry safe.

        With ``depends_on`` (jobs or ids, or one of them) it is deferred until
        each of them is done: enqueued when the last succeeds, cancelled when
        one ends otherwise, unless ``allow_failure``. NoSuchJobError, nothing
        stored, for an id no job has.
        """
        return self._enqueue(task_name, [params], [unique_key], None, delay, eta, time_limit, priority,
                             depends_on, allow_failure)[0]

    def enqueue_many(self, task_name: str | Task | Callable[..., Any],
                     params_list: Iterable[JobParams | None], *,
                     delay: float | None = None, eta: datetime | None = None,
                     time_limit: float | object | None = _TASKS_OWN, priority: int | None = None,
                     unique_keys: Iterable[str | None] | None = None, depends_on: Dependencies = None,
                     allow_failure: bool = False) -> list[Job]:
        """Store one job per params in a few round trips; TypeError stores none of them.

        ``unique_keys``, if given, has one key (or None) per params, as enqueue's ``unique_key``;
        each job depends on all of ``depends_on``.
        """
        params_list = list(params_list)
        return self._enqueue(task_name, params_list, _one_key_each(params_list, unique_keys), None, delay,
                             eta, time_limit, priority, depends_on, allow_failure)

    def enqueue_wait(self, task_name: str | Task | Callable[..., Any], params: JobParams | None = None,
                     timeout: float = DEFAULT_WAIT_TIMEOUT, *, delay: float | None = None,
                     eta: datetime | None = None, time_limit: float | object | None = _TASKS_OWN,
                     priority: int | None = None, depends_on: Dependencies = None,
                     allow_failure: bool = False) -> Job:
        """Enqueue a job and return it done; QueueWaitTimeoutError after ``timeout`` seconds.

        On a timeout the job keeps its place and runs later; the exception
        carries it in ``job``. A worker reporting the outcome learns
        (success() returns True) whether this caller received it. It takes no
        unique_key: a job has one waiter, and another caller may wait on it.
        """
        timeout = max(timeout, 0.0)
        job = self._enqueue(task_name, [params], [None], timeout, delay, eta, time_limit, priority,
                            depends_on, allow_failure)[0]
        try:
            with self._server:
                done = self._await_outcome(job, timeout)
        except BaseException:
            # Withdraw, if the server lets us, so that no worker reports a hand-off nobody got.
            with contextlib.suppress(Exception):
                self._await_outcome(job, 0)
            raise
        if done is None:
            raise QueueWaitTimeoutError(job=job)
        return done

    def _enqueue(self, *args: Any) -> list[Job]:
        batch, jobs = self._prepare(*args)
        if not jobs:
            return []
        with self._server:
            return self._built(batch, jobs, self._insert(batch, jobs))

    def _prepare(self, task_name: str, params_list: list[JobParams | None], unique_keys: list[str | None],
                 waiter_timeout: float | None, delay: float | None, eta: datetime | None,
                 time_limit: float | object | None, priority: int | None, depends_on: Dependencies,
                 allow_failure: bool) -> tuple[_Batch, list[tuple[str, str | None]]]:
        """Check and encode what enqueue and its twins are given, or raise; nothing is stored."""
        task_name = self._name_of(task_name)
        if self._tasks and task_name not in self._tasks:
            _log_once(f"enqueue: no task {task_name!r} is registered on this queue: a worker that runs it "
                      f"must register it, or its jobs wait for good")
        if priority is None:
            priority = self._tasks[task_name].priority if task_name in self._tasks else 0
        spec = _Batch(task_name, _enqueue_stack(), waiter_timeout, _delay(delay, eta, self._clock_ms),
                      # Stored only when given: 0 for none, else the seconds. Otherwise the task's applies.
                      None if time_limit is _TASKS_OWN else float(_check_time_limit(time_limit) or 0),
                      _check_priority(priority), _dependency_ids(depends_on), bool(allow_failure))
        jobs = []
        for params, unique_key in zip(params_list, unique_keys):
            if unique_key is not None and (not isinstance(unique_key, str) or not unique_key):
                raise ValueError(f"a unique_key must be a non-empty string, not {unique_key!r}")
            jobs.append((_encoded_params(params), unique_key))
        return spec, jobs

    def _name_of(self, task: str | Task | Callable[..., Any]) -> str:
        """The name of a task given by name, by its handle or Task, or by its function."""
        if type(task) is str and task:
            return task
        if isinstance(task, Task):
            return task.name
        if callable(task):
            registered = [name for name, of in self._tasks.items() if getattr(of, "function", None) is task]
            if not registered:
                raise ValueError(f"{task!r} is no task registered on this queue: pass its name")
            return registered[0]
        _check_task_name(task)
        return task

    def _built(self, batch: _Batch, jobs: list[tuple[str, str | None]],
               stored: list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]) -> list[Job]:
        """The Job of each job _insert stored, or the stored job that holds its unique key (or,
        for jobs with dependencies, the job as stored: deferred, enqueued or cancelled already)."""
        return [self._decode(job_id, holder) if holder is not None else
                Job(self, job_id, batch.task, json.loads(params),
                    JobStatus(JOB_STATE_DEFERRED if batch.depends_on else JOB_STATE_ENQUEUED, enqueued,
                              scheduled=scheduled), batch.stack,
                    time_limit=batch.time_limit, priority=batch.priority, unique_key=unique_key,
                    dependency_ids=batch.depends_on)
                for (job_id, enqueued, scheduled, holder), (params, unique_key) in zip(stored, jobs)]

    # -- producing from asyncio code -------------------------------------------

    async def aenqueue(self, task_name: str | Task | Callable[..., Any], params: JobParams | None = None, *,
                       delay: float | None = None, eta: datetime | None = None,
                       time_limit: float | object | None = _TASKS_OWN, priority: int | None = None,
                       unique_key: str | None = None, depends_on: Dependencies = None,
                       allow_failure: bool = False) -> Job:
        """enqueue(), for code on an event loop: the same options and errors, and it never
        blocks the loop."""
        return (await self._aenqueue(task_name, [params], [unique_key], None, delay, eta, time_limit,
                                     priority, depends_on, allow_failure))[0]

    async def aenqueue_many(self, task_name: str | Task | Callable[..., Any],
                            params_list: Iterable[JobParams | None], *,
                            delay: float | None = None, eta: datetime | None = None,
                            time_limit: float | object | None = _TASKS_OWN, priority: int | None = None,
                            unique_keys: Iterable[str | None] | None = None,
                            depends_on: Dependencies = None, allow_failure: bool = False) -> list[Job]:
        """enqueue_many(), for code on an event loop."""
        params_list = list(params_list)
        return await self._aenqueue(task_name, params_list, _one_key_each(params_list, unique_keys), None,
                                    delay, eta, time_limit, priority, depends_on, allow_failure)

    async def aenqueue_wait(self, task_name: str | Task | Callable[..., Any], params: JobParams | None = None,
                            timeout: float = DEFAULT_WAIT_TIMEOUT, *, delay: float | None = None,
                            eta: datetime | None = None, time_limit: float | object | None = _TASKS_OWN,
                            priority: int | None = None, depends_on: Dependencies = None,
                            allow_failure: bool = False) -> Job:
        """enqueue_wait(), for code on an event loop: a thousand of them wait at once on one loop,
        with no thread each. Cancelled while it waits, it withdraws: exactly one of the
        caller and the worker's success() sees the hand-off."""
        import asyncio

        timeout = max(timeout, 0.0)
        # Stored even if cancelled meanwhile (a request on its way may store it): then it is
        # withdrawn as soon as it is, before the cancel goes on.
        storing = asyncio.ensure_future(self._aenqueue(task_name, [params], [None], timeout, delay, eta,
                                                       time_limit, priority, depends_on, allow_failure))
        try:
            job = (await asyncio.shield(storing))[0]
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._aawait_outcome((await storing)[0], 0)
            raise
        try:
            with self._server:
                done = await self._aawait_outcome(job, timeout)
        except BaseException:  # asyncio.CancelledError too
            with contextlib.suppress(Exception):
                await self._aawait_outcome(job, 0)
            raise
        if done is None:
            raise QueueWaitTimeoutError(job=job)
        return done

    async def aretrieve_job(self, job_id: str) -> Job:
        """retrieve_job(), for code on an event loop."""
        with self._server:
            return self._decode(job_id, await self._aload(job_id))

    async def _aenqueue(self, *args: Any) -> list[Job]:
        batch, jobs = self._prepare(*args)
        if not jobs:
            return []
        with self._server:
            return self._built(batch, jobs, await self._ainsert(batch, jobs))

    # -- reading and deleting ------------------------------------------------

    def retrieve_job(self, job_id: str) -> Job:
        """Return the stored job; NoSuchJobError for an unknown or malformed id."""
        with self._server:
            return self._decode(job_id, self._load(job_id))

    def list_jobs(self, state: str | None = None, task_name: str | None = None,
                  limit: int | None = None, offset: int = 0, newest_first: bool = False) -> list[Job]:
        """Return stored jobs, oldest first, optionally of one state and task, a page at a time.

        ``state`` is a JOB_STATE_* value or "failed" (done with an error). Jobs
        that can't be decoded are logged and left out.
        """
        if state is not None and state not in _COUNTED_STATES:
            raise ValueError(f"unknown job state {state!r}")
        _check_page(limit, offset)
        if limit == 0:
            return []
        with self._server:
            stored = self._list(state, task_name, limit, offset, newest_first)
        jobs = []
        for job_id, fields in stored:
            try:
                jobs.append(self._decode(job_id, fields))
            except MalformedJobError as exc:
                logger.warning("%s", exc)
        return jobs

    def stats(self) -> dict[str, Any]:
        """Return job counts per task and state, the workers alive, jobs done per minute, and
        per task the jobs finished and failed ever, with run-time and queue-wait histograms.

        ``done_per_minute`` covers the last 15 minutes, oldest first; a
        worker is alive while its heartbeat is less than WORKER_ALIVE_LEASES (3) leases old.
        ``metrics[task]`` has ``finished`` and ``failed`` (counters that never
        go down, not even when results expire), and ``run_seconds`` and
        ``wait_seconds`` (enqueued or due -> started): each a histogram with
        ``count``, ``sum``, cumulative ``buckets`` as [upper bound, jobs] and
        the ``p50``, ``p95`` and ``p99`` estimated from them. ``periodic``
        lists the schedules the workers fire: name, task, schedule (the
        expression), next and last tick (ISO 8601) and last_job (an id).
        ``unserved`` names the tasks with enqueued (or delayed) jobs that no
        live worker runs: a typo, or a worker missing. ``malformed`` says what
        was left out because it can't be read (an
        entry of the shared records that isn't what this library writes, a
        key of the wrong type): the rest is served.
        """
        with self._server:
            counts, workers, per_minute, metrics, malformed = self._stats()
            periodic = self._periodic()
        # The one place where the shared records are read back: an entry that can't be read
        # is left out, said in "malformed" and once in the log.

        def read(what: str, decode: Callable[..., Any], *stored: Any) -> Any:
            try:
                return decode(*stored)
            except (TypeError, ValueError, KeyError, RecursionError) as exc:
                malformed.append(_printable(f"{what} left out: {_describe(exc)}"))
                return None
        by_task: dict[str, dict[str, int]] = {}
        for key, number in sorted(counts, key=lambda entry: entry[0]):  # a sharded queue's are summed
            state, _, task_name = key.partition(":")
            if read(f"the count {key!r}", _count, state, number):
                of_task = by_task.setdefault(_printable(task_name), dict.fromkeys(_COUNTED_STATES, 0))
                of_task[state] += int(number)
        alive: dict[str, tuple[datetime, list[str]]] = {}
        for worker, seen, tasks in workers:  # a Redis queue's shards each list its workers
            record, worker = read(f"the worker {worker!r}", _worker_record, seen, tasks), _printable(worker)
            if record is not None and (worker not in alive or alive[worker][0] < record[0]):
                alive[worker] = record
        good_metrics: collections.Counter[str] = collections.Counter()
        for key, number in metrics:
            if read(f"the metric {key!r}", _metric_entry, key, number):
                good_metrics[_printable(key)] += int(number)
        schedules = [record for record in (read(f"the schedule {raw!r:.60}", _schedule_record, raw)
                                           for raw in periodic) if record is not None]
        for note in malformed:
            _log_once(note)
        served = {task for _, tasks in alive.values() for task in tasks}
        return {"counts": by_task,
                "workers": [{"id": worker, "last_seen": _iso(seen), "tasks": tasks}
                            for worker, (seen, tasks) in sorted(alive.items())],
                "done_per_minute": per_minute,
                "metrics": _task_metrics(good_metrics),
                "periodic": sorted(schedules, key=lambda record: record["name"]),
                "unserved": [task for task, of_task in by_task.items()
                             if of_task[JOB_STATE_ENQUEUED] and task not in served],
                "malformed": malformed}

    def retry_job(self, job_id: str) -> Job:
        """Run a done job again from its first attempt; NoSuchJobError, ValueError if it isn't done."""
        with self._server:
            if not self._requeue(job_id):
                raise ValueError(f"job {job_id} is not done: only a done job can be retried")
        return self.retrieve_job(job_id)

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a job that isn't done and return it; NoSuchJobError, ValueError for a done job.

        An enqueued or delayed job is done at once and never runs. A running
        one is interrupted by its worker, which the server tells at once
        (within a heartbeat, a third of ``lease_timeout``, where it can't push),
        with JobCancelledError raised in its thread; the job returned may be
        running still, or done already. Either way it ends done with an error
        that starts with "cancelled", and is listed and counted with the failed jobs.
        """
        with self._server:
            if not self._cancel(job_id):
                raise ValueError(f"job {job_id} is done: only a job that isn't done can be cancelled")
        return self.retrieve_job(job_id)

    def retry_jobs(self, task_name: str | None = None) -> int:
        """Run every failed job (of one task, or of all) again from its first attempt; return how many."""
        with self._server:
            return self._bulk("retry", "failed", task_name)

    def delete_jobs(self, state: str, task_name: str | None = None) -> int:
        """Delete every job in ``state`` (of one task, or of all); return how many.

        ``state`` is "enqueued", "done" (the failed jobs too, as list_jobs
        shows them) or "failed"; ValueError for any other.
        """
        if state not in (JOB_STATE_ENQUEUED, JOB_STATE_DONE, "failed"):
            raise ValueError(f"delete_jobs takes state enqueued, done or failed, not {state!r}")
        with self._server:
            return self._bulk("delete", state, task_name)

    def delete_job(self, job_id: str) -> None:
        """Remove the job wherever it is; NoSuchJobError for an unknown id."""
        with self._server:
            if not self._delete(job_id):
                raise NoSuchJobError()

    def reset_storage(self) -> None:
        """Erase every job of this queue; the queue stays usable."""
        with self._server:
            self._reset()

    def close(self) -> None:
        """Stop the worker loop if one runs and release the server connections."""
        self.stop()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _answer_lost(self, exc: BaseException) -> bool:
        """Whether a driver's error came after the request was sent (its outcome is unknown)."""
        return False

    # -- the worker: process_loop runs a _Worker -------------------------------

    def process_loop(self) -> None:
        """Claim and run jobs on ``concurrency`` threads until stop() is called.

        A heartbeat thread renews the leases of the running jobs, makes jobs
        whose lease ran out (their worker died) claimable again, interrupts
        cancelled jobs and stores progress; a timer thread interrupts jobs at
        their time limit. While the server is away the loop backs off and goes
        on when it returns. ValueError if this queue object doesn't fit the
        stored queue (a Redis queue's number of shards), once its running jobs
        are done.
        """
        worker = _Worker(self)
        with self._worker_lock:
            if self._worker is not None:
                raise RuntimeError("process_loop is already running on this queue")
            self._worker = worker
        try:
            worker.run()
        finally:
            with self._worker_lock:
                self._worker = None
            worker.ended.set()

    def stop(self) -> None:
        """End process_loop and wait for its running jobs; safe to call at any time.

        Called on the loop's own thread (from a signal handler), it returns at
        once and process_loop returns when its running jobs are done.
        """
        with self._worker_lock:
            worker = self._worker
        if worker is not None:
            worker.stop()

    def wait(self) -> None:
        """Wait until no job is running on this queue's worker threads or event loop."""
        with self._worker_lock:
            worker = self._worker
        if worker is not None:
            worker.wait()

    def _clock_ms(self) -> int:
        """The time, in ms, that this queue's ticks and etas are read in: this process's clock
        (MongoDB's queue reads its server's)."""
        return _now_ms()

    def _time_limit_of(self, job: Job) -> float | None:
        """The job's own time limit if it was enqueued with one, else its task's."""
        return self._tasks[job.task_name].time_limit if job._time_limit is None else job._time_limit

    def _report(self, job: Job, result: str | None, error: str | None, retryable: bool,
                traceback: str | None = None, cancelled: bool = False) -> bool:
        """Record a job's outcome, or schedule its retry; True if a waiter received it.

        A job cancelled while it ran is done as cancelled, never retried. While
        the server is away the report is retried until the job's lease would
        have run out; after that the job is redelivered instead.
        """
        task = self._tasks.get(job.task_name)
        attempt = job.status.attempt
        retry_in = None
        if task is not None and task.max_retries and error is not None and retryable:
            if attempt <= task.max_retries:
                retry_in = task.retry_delay * 2 ** (attempt - 1)
            else:
                error = f"{error} (after {attempt} attempts)"
        deadline = time.monotonic() + self.lease_timeout
        while True:
            try:
                with self._server:
                    retried = None if retry_in is None else self._retry(job, retry_in, traceback)
                    if retried is None and retry_in is None:
                        outcome = "succeeded" if error is None else "cancelled" if cancelled else "failed"
                        received = self._finish(job, result, error, traceback, outcome)
                    elif retried is False:  # cancelled while it ran
                        retry_in, error = None, CANCELLED_WHILE_RUNNING
                        received = self._finish(job, None, error, traceback, "cancelled")
                    else:
                        received = False if retried else None
                break
            except ServerUnavailableError as exc:
                if time.monotonic() > deadline:
                    logger.error("job %s: outcome not recorded, it will be redelivered: %s", job.id, exc)
                    return False
                time.sleep(self._outage.failed(exc))
        self._outage.recovered()
        if received is None:
            logger.warning("job %s: outcome not recorded: the job was deleted, or its lease was lost "
                           "to another delivery", job.id)
        elif retry_in is not None:
            logger.warning("job %s failed on attempt %d, retrying in %.3gs: %s",
                           job.id, attempt, retry_in, error)
        elif logger.isEnabledFor(logging.INFO):
            began = job._run.began if job._run is not None else time.monotonic()
            logger.info("job %s (%s) %s in %.3fs", job.id, job.task_name,
                        "succeeded" if error is None else f"failed: {error:.200}", time.monotonic() - began)
        return bool(received)

    # -- decoding stored jobs ------------------------------------------------

    def _decode(self, job_id: str, fields: dict[str, Any]) -> Job:
        """Build a Job from a stored record; MalformedJobError says what is wrong with it.

        Every backend stores the same fields: task, params (JSON text), state,
        enqueued/started/done/due (milliseconds since the epoch), result (JSON
        text) or error (text), stack, attempt (runs by retries), delivery
        (claims so far), and when set: progress (JSON text), traceback,
        time_limit (seconds, 0 for none), priority, unique_key and depends_on (the
        ids, as a list or its JSON text).

        The one place where job records are read back: whatever is wrong with one
        (a field missing or of the wrong type, bytes that aren't UTF-8, JSON nested
        too deeply, a state that is no job state) fails this record alone.
        """
        # One pass over what is stored: a field absent costs nothing, the hot path's case.
        values: dict[str, Any] = {}
        for name, value in fields.items():
            convert = _DECODED_FIELDS.get(name)
            if convert is None or value is None:
                continue
            try:
                if isinstance(value, str) and not value.isascii():
                    value.encode()  # bytes that weren't UTF-8 were read back as surrogates
                values[name] = convert(value)
            except UnicodeEncodeError:
                raise MalformedJobError(f"job {_printable(job_id)} can't be decoded: its {name} is not "
                                        f"UTF-8 text: {_printable(value)!r:.60}") from None
            except (TypeError, ValueError, RecursionError) as exc:
                raise MalformedJobError(f"job {_printable(job_id)} can't be decoded: its {name} "
                                        f"{value!r:.60} is wrong: {_describe(exc)}") from None
        for name in ("task", "params", "state", "enqueued"):
            if name not in values:
                raise MalformedJobError(f"job {_printable(job_id)} can't be decoded: its {name} is missing")
        get = values.get
        return Job(self, job_id, values["task"], values["params"],
                   JobStatus(values["state"], values["enqueued"], get("started"), get("done"),
                             get("attempt", 1), get("due"), get("outcome")),
                   get("stack", ""), delivery=_int(fields.get("delivery")), result=get("result"),
                   error=get("error"), progress=get("progress"), traceback=get("traceback") or None,
                   time_limit=get("time_limit"), priority=get("priority", 0), unique_key=get("unique_key"),
                   dependency_ids=get("depends_on"))

    # -- storage primitives, supplied by each backend ------------------------

    def _check_fit(self) -> None:
        """Raise ValueError if this queue object can't serve the stored queue (a Redis queue
        over another number of shards), recording what the stored queue lacks. A worker
        checks at its start and each claim again."""

    def _insert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        """Store jobs of batch.task, one per (JSON params text, unique key or None), all at once.

        Return (id, enqueued, scheduled, None) for each job stored. A job whose
        unique key an unfinished job of the task holds is not stored: return
        (that job's id, -, -, its stored fields), decided atomically with the
        store, and a key is held from its job's store to its outcome. A
        ``batch.delay`` above zero keeps the jobs from being claimed until
        then; ``waiter_timeout`` marks them awaited; ``time_limit`` and
        ``priority`` are stored with them (claims take higher priorities first,
        then the oldest).

        With ``batch.depends_on`` every dependency must exist, else
        NoSuchJobError and nothing is stored. The jobs are stored deferred and
        return their stored fields (4th): the dependencies done already settle
        them at once, as the end of each other one will, exactly once, however
        it ends (a success, a failure, a cancel, a delete before it was done).
        The rule of a settle: a job whose dependency ended without a success is
        cancelled with DEPENDENCY_ENDED (unless ``allow_failure``), and its own
        dependents are settled in turn as cancelled; one whose dependencies
        have all ended is enqueued, due when its delay says. A done job isn't
        expired by result_ttl while a dependent of it is deferred.
        """
        raise NotImplementedError

    def _fire(self, schedule: _Schedule, tick: int | None, next_tick: int, batch: _Batch
              ) -> tuple[str | None, int | None]:
        """Record the schedule (task, expression, next tick) and, atomically, if ``tick`` (ms)
        is later than the last tick fired, enqueue its job as _insert would (with the
        schedule's params and unique key) and record the tick and that job as the last ones.

        Return the id of the job enqueued (or None: the tick was fired already, or ``tick`` is
        None) and the last tick fired before this call (or None).
        """
        raise NotImplementedError

    def _periodic(self) -> list[Any]:
        """Return the recorded schedules as stored, each a dict or its JSON text: name, task,
        schedule (the expression), next and last (ms since the epoch, or None) and last_job
        (an id, or None). stats() reads them."""
        raise NotImplementedError

    def _claim(self, task_names: list[str], limit: int, worker: str, block: float,
               stopping: threading.Event) -> Iterable[tuple[str, dict[str, Any]]]:
        """Atomically take up to ``limit`` due enqueued jobs of these tasks, oldest first per task.

        A job in a task's queue that is no longer enqueued (cancelled) is dropped.

        Each taken job is running, with ``started``, ``worker``, a lease and a
        new ``delivery`` recorded in the same step. With nothing to take, wait
        up to ``block`` seconds for new work, unless ``stopping`` is set (stop()
        sets it, then calls _interrupt_claim). Return (id, stored fields) pairs,
        or yield them: a backend that takes one job per round trip lets each
        start while it takes the next. ValueError if this queue object doesn't
        fit the stored queue: the worker ends.
        """
        raise NotImplementedError

    def _finish(self, job: Job, result: str | None, error: str | None, traceback: str | None,
                outcome: str) -> bool | None:
        """Record the outcome if ``job`` still holds its delivery, and hand it to the waiter.

        Atomically: state done, done time, ``outcome`` (one of OUTCOMES), result or error, the traceback (or
        none), the job's last progress if it set any, no longer held, kept for
        ``result_ttl`` then removed by the server, and the task's metrics
        (finished, failed, run time and queue wait: see _task_metrics).
        Return True if an enqueue_wait caller was waiting (it gets the job),
        False if none was, None if the job is gone or held by another delivery.
        """
        raise NotImplementedError

    def _retry(self, job: Job, delay: float, traceback: str | None) -> bool | None:
        """Put a held job back, due in ``delay`` seconds, with its attempt counted and the
        traceback of the failed attempt; None if not held, False (and nothing changed) if it
        was cancelled while it ran: the caller finishes it as cancelled instead."""
        raise NotImplementedError

    def _save_progress(self, progress: dict[Job, str]) -> None:
        """Store each running job's progress (JSON text), where that delivery still holds it."""
        raise NotImplementedError

    def _cancel(self, job_id: str) -> bool:
        """Cancel a job atomically; False if it is done already, NoSuchJobError if there is none.

        An enqueued (or delayed) job becomes done with CANCELLED_BEFORE_IT_RAN,
        as _finish would record it, and is never claimed; a running one is
        marked, for _heartbeat to tell its worker.
        """
        raise NotImplementedError

    def _bulk(self, action: str, state: str, task_name: str | None) -> int:
        """Apply ``action`` ("retry" as _requeue, or "delete" as _delete) to every job in
        ``state`` (as list_jobs reads it), of one task or all; return how many.

        Each job is checked again atomically as it is changed; on a server that runs one
        command at a time (Redis), one call changes at most BULK_BATCH jobs.
        """
        raise NotImplementedError

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        """Wait up to ``timeout`` for the job's outcome and return the job done.

        On a timeout withdraw the waiter atomically, so that exactly one of
        this call and _finish wins: return None only if no outcome was handed.
        """
        raise NotImplementedError

    def _heartbeat(self, worker: str, held: list[Job]) -> list[str]:
        """Renew the leases of the jobs ``worker`` holds and record it alive; requeue jobs whose
        lease ran out; return the ids of the held jobs that were cancelled.

        A job whose lease ran out max_deliveries times is done with POISON_ERROR
        instead; a cancelled one with CANCELLED_WHILE_RUNNING. Workers not seen
        for WORKER_ALIVE_LEASES leases are forgotten.
        """
        raise NotImplementedError

    def _retire(self, worker: str) -> None:
        """Forget a worker that stopped: it is no longer listed as alive."""
        raise NotImplementedError

    def _interrupt_claim(self, worker: str) -> None:
        """Wake ``worker`` if it is blocked in _claim or _await_cancel, so that stop() returns at
        once."""
        raise NotImplementedError

    def _await_cancel(self, worker: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the server to push a cancel of a job ``worker``
        runs (then return True: its heartbeat runs at once), or for _interrupt_claim."""
        raise NotImplementedError

    def _load(self, job_id: str) -> dict[str, Any]:
        """Return the stored fields of one job; raise NoSuchJobError."""
        raise NotImplementedError

    def _dependent_ids(self, job_id: str) -> list[str]:
        """The ids of the jobs that depend on this one, oldest first, for the dashboard and the
        CLI (a result past its ttl may have forgotten those no longer deferred)."""
        raise NotImplementedError

    def _list(self, state: str | None, task_name: str | None, limit: int | None, offset: int,
              newest_first: bool) -> list[tuple[str, dict[str, Any]]]:
        """Return (id, stored fields) of the jobs that match, in order, skipping ``offset``.

        Without filters in enqueue order; must not read every job to return a page.
        """
        raise NotImplementedError

    def _stats(self) -> _Stats:
        """Return the counts as stored ("STATE:TASK", n), with "failed" apart from "done"; the
        workers alive as stored (id, last seen, task names); jobs done in each of the last 15
        minutes; the metrics kept by _finish as stored (key, n: see _observe); and what was
        found of the wrong type, said. stats() reads and sums the entries."""
        raise NotImplementedError

    def _requeue(self, job_id: str) -> bool:
        """Make a done job enqueued again, attempt 1, due now, REQUEUE_CLEARS cleared, holding its
        unique key unless an unfinished job took it; False if it isn't done.

        Raise NoSuchJobError.
        """
        raise NotImplementedError

    def _delete(self, job_id: str) -> bool:
        """Remove the job and every reference to it; return False if there was none."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Remove every job and every structure of this queue."""
        raise NotImplementedError

    # The primitives of the a* methods: each one's sync twin, without blocking the event loop.
    # These run the twin on a thread of the loop's executor, for a client passed in that
    # has no asyncio twin; the backends use their drivers' asyncio clients.

    async def _ainsert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                       ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._insert, batch, jobs)

    async def _aawait_outcome(self, job: Job, timeout: float) -> Job | None:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._await_outcome, job, timeout)

    async def _aload(self, job_id: str) -> dict[str, Any]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._load, job_id)

    def _loop_client(self, make: Callable[[], Any]) -> Any:
        """The running event loop's asyncio client of the server, made on first use: a driver's
        asyncio client is bound to the loop it first ran on."""
        import asyncio

        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = make()
        return client


# ---------------------------------------------------------------------------
# Shared machinery: encoding, times, the enqueue stack, outages, dispatch
# ---------------------------------------------------------------------------

_json_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_json_utf8_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _encode(value: Any) -> str:
    """Encode a JSON-compatible value once; TypeError names what isn't compatible."""
    try:
        text = _json_encoder.encode(value)
        if "\\ud" in text:  # a surrogate: of a character beyond U+FFFF, or a lone one
            _json_utf8_encoder.encode(value).encode()
        return text
    except UnicodeEncodeError:  # as os.fsdecode gives for a file name that isn't UTF-8
        raise TypeError("value holds a lone surrogate, which is not Unicode text: decode it with "
                        "errors='replace', or pass the bytes as base64") from None
    except ValueError as exc:  # NaN and infinities, which JSON can't carry
        raise TypeError(str(exc)) from None
    except RecursionError:
        raise TypeError("value is nested too deeply or is circular") from None


def _encoded_params(params: JobParams | None) -> str:
    """A job's params as JSON text ({} for None); TypeError if they aren't a JSON object."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise TypeError(f"job params must be a dict, not {type(params).__name__}")
    return _encode(params)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback_of(exc: BaseException) -> str | None:
    """The traceback of an exception that was raised, from the task's first frame (not the
    worker's), within TRACEBACK_LIMIT; None if it wasn't raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _in_this_file(tb.tb_frame):
        tb = tb.tb_next
    return None if tb is None else _bounded_traceback(traceback.format_exception(type(exc), exc, tb))


def _bounded_traceback(lines: list[str]) -> str:
    """Join a traceback's lines, keeping its first line, the error and the innermost frames
    that fit in TRACEBACK_LIMIT bytes: where it failed matters more than how it got there."""
    kept: list[str] = []
    size = len(lines[0].encode()) + 6
    for line in reversed(lines[1:]):
        size += len(line.encode())
        if size > TRACEBACK_LIMIT and kept:
            return lines[0] + "  ...\n" + "".join(reversed(kept))
        kept.append(line)
    text = "".join(lines)
    return text if len(text.encode()) <= TRACEBACK_LIMIT else text.encode()[:TRACEBACK_LIMIT].decode(
        errors="ignore")


def _task_frames(frames: list[tuple[types.FrameType, int]]) -> traceback.StackSummary:
    """Where an interrupted task was, outermost first, from its own first frame: the worker's
    frames (of this file, and of the thread or event loop that runs it) left out, as they
    are from the traceback of an exception the task raised."""
    while frames and (_in_this_file(frames[0][0]) or frames[0][0].f_code.co_filename == threading.__file__):
        frames.pop(0)
    return traceback.StackSummary.extract(frames, lookup_lines=False)


def _raise_in_thread(thread_id: int, exception: type[BaseException]) -> None:
    """Make ``exception`` raise in another thread the next time it runs Python code."""
    import ctypes  # only a worker that interrupts a job pays for the import

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exception))


def _check_task_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task name must be a non-empty string, not {name!r}")


def _check_page(limit: int | None, offset: int) -> None:
    """Refuse a page no server can seek: ValueError unless whole numbers from 0 to 2**63 - 1."""
    for name, value in (("limit", 0 if limit is None else limit), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ValueError(f"{name} must be a whole number from 0 to 2**63 - 1, not {value!r}")


def _one_key_each(params_list: list[JobParams | None], unique_keys: Iterable[str | None] | None
                  ) -> list[str | None]:
    keys: list[str | None] = [None] * len(params_list) if unique_keys is None else list(unique_keys)
    if len(keys) != len(params_list):
        raise ValueError(f"{len(keys)} unique_keys for {len(params_list)} jobs: give one per job")
    return keys


def _is_coroutine_function(function: Any) -> bool:
    """Whether a function or method is ``async def``: read from its code's flags, which
    spares every producer and sync worker the import of inspect or asyncio."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return code is not None and bool(code.co_flags & 0x80)  # inspect.CO_COROUTINE


def _check_priority(priority: Any) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"a priority must be an int, not {type(priority).__name__}")
    if not -100 <= priority <= 100:
        raise ValueError(f"a priority must be from -100 to 100, not {priority}")
    return priority


def _check_time_limit(limit: Any) -> Any:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"time_limit must be a positive number of seconds or None, not {limit!r}")
    return limit


def _observe(metrics: collections.Counter[str], task: str, failed: bool, run_ms: int | None,
             wait_ms: int | None) -> None:
    """Count a finished job into ``metrics`` as every backend keeps them: "finished:TASK",
    "failed:TASK", and for a job that ran, "run:TASK:I" and "wait:TASK:I" (I: the index of
    its bucket in HISTOGRAM_BUCKETS, len() for +Inf) with their sums "run_ms:TASK" and
    "wait_ms:TASK"."""
    metrics[f"finished:{task}"] += 1
    if failed:
        metrics[f"failed:{task}"] += 1
    for kind, ms in (("run", run_ms), ("wait", wait_ms)):
        if ms is not None:
            metrics[f"{kind}:{task}:{bisect.bisect_left(_BUCKETS_MS, ms)}"] += 1
            metrics[f"{kind}_ms:{task}"] += ms


def _task_metrics(metrics: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Turn the metrics _observe counts into stats()["metrics"]: per task, counters and histograms."""
    tasks: dict[str, dict[str, Any]] = {}
    for key, number in sorted(metrics.items()):
        task, field = _metric_of(key)
        kind, _, index = field.partition(":")
        of_task = tasks.setdefault(task, {"finished": 0, "failed": 0, "run_ms": 0, "wait_ms": 0,
                                          "run": [0] * (len(HISTOGRAM_BUCKETS) + 1),
                                          "wait": [0] * (len(HISTOGRAM_BUCKETS) + 1)})
        if kind in ("run", "wait"):
            of_task[kind][min(_int(index), len(HISTOGRAM_BUCKETS))] += int(number)
        elif kind in of_task:
            of_task[kind] += int(number)
    return {task: {"finished": m["finished"], "failed": m["failed"],
                   "run_seconds": _histogram(m["run"], m["run_ms"]),
                   "wait_seconds": _histogram(m["wait"], m["wait_ms"])} for task, m in tasks.items()}


def _histogram(counts: list[int], sum_ms: int) -> dict[str, Any]:
    cumulative = list(itertools.accumulate(counts))
    bounds: list[float | str] = [*HISTOGRAM_BUCKETS, "+Inf"]
    return {"count": cumulative[-1], "sum": sum_ms / 1000,
            "buckets": [[bound, n] for bound, n in zip(bounds, cumulative)],
            **{f"p{q}": _quantile(q / 100, cumulative) for q in (50, 95, 99)}}


def _quantile(q: float, cumulative: list[int]) -> float | None:
    """Estimate a quantile from cumulative bucket counts, straight-line within its bucket
    (as Prometheus' histogram_quantile); None without observations."""
    rank = q * cumulative[-1]
    for i, count in enumerate(cumulative):
        if count and count >= rank:
            if i == len(HISTOGRAM_BUCKETS):
                return HISTOGRAM_BUCKETS[-1]  # past the last bound: all that can be said
            lower, before = (HISTOGRAM_BUCKETS[i - 1], cumulative[i - 1]) if i else (0.0, 0)
            return round(lower + (HISTOGRAM_BUCKETS[i] - lower) * (rank - before) / (count - before), 4)
    return None


def _metric_of(key: str) -> tuple[str, str]:
    """Split a key of _observe into its task and the rest: ("TASK", "run:3") for "run:TASK:3"."""
    kind, _, task = key.partition(":")
    if kind in ("run", "wait"):
        task, _, index = task.rpartition(":")
        return task, f"{kind}:{index}"
    return task, kind


def _metric_key(task: str, field: str) -> str:
    """The key of _observe for a task and the rest, as _metric_of split it."""
    kind, _, index = field.partition(":")
    return f"{kind}:{task}:{index}" if index else f"{kind}:{task}"


# -- reading back what a server stores: bad data is said, never fatal --------

def _printable(text: str) -> str:
    """Text read back from a server, with the bytes that weren't UTF-8 (read as surrogates)
    shown escaped, as \\xff: safe to print, log and put in a page."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that no bytes were read as
        return text.encode("utf-8", "backslashreplace").decode()


_logged_once: set[str] = set()


def _log_once(note: str) -> None:
    """Log a warning about bad stored data the first time it is seen by this process: a
    dashboard reads stats every few seconds, and the same junk would fill the log."""
    if note not in _logged_once:
        _logged_once.add(note)
        logger.warning("%s", note)


def _whole(value: Any) -> int:
    """A stored whole number: an int, or its digits as text; ValueError or TypeError else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{type(value).__name__} is not a whole number")
    return int(value)


def _count(state: str, number: Any) -> int:
    if state not in _COUNTED_STATES:
        raise ValueError(f"{state!r} is not a job state")
    return _whole(number)


def _worker_record(seen: Any, tasks: Any) -> tuple[datetime, list[str]]:
    """A worker's heartbeat as stored: when it was seen (ms or a date) and its task names (a
    list, or one in JSON)."""
    moment = seen if isinstance(seen, datetime) else _time(_whole(seen))
    names = json.loads(tasks) if isinstance(tasks, str) else tasks
    if moment is None or not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise TypeError("its time or its list of task names is wrong")
    return moment, [_printable(name) for name in names]


def _metric_entry(key: str, number: Any) -> bool:
    """Check one counter of _observe as stored: its key's shape and a whole number."""
    kind, _, index = _metric_of(key)[1].partition(":")
    if kind not in ("finished", "failed", "run_ms", "wait_ms") and not (
            kind in ("run", "wait") and index.isdigit() and int(index) <= len(HISTOGRAM_BUCKETS)):
        raise ValueError("not a metric this library counts")
    _whole(number)
    return True


def _schedule_record(raw: Any) -> dict[str, Any]:
    """A schedule's record as stats() shows it, from its stored JSON text or fields."""
    record = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    for name in ("name", "task", "schedule"):
        if not isinstance(record.get(name), str):
            raise TypeError(f"its {name} is missing or not text")
    return {"name": _printable(record["name"]), "task": _printable(record["task"]),
            "schedule": _printable(record["schedule"]),
            "next": _iso(_time(record.get("next"))), "last": _iso(_time(record.get("last"))),
            "last_job": None if record.get("last_job") is None else _printable(str(record["last_job"]))}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# Counted apart in stats: "failed" are the done jobs with an error.
_COUNTED_STATES = (JOB_STATE_DEFERRED, JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE, "failed")


def _state_text(job: dict[str, Any]) -> str:
    """A job's state, as Job.as_dict() gives it, with its outcome once done: "done (failed)"."""
    return f"{job['state']} ({job['outcome']})" if job.get("outcome") else job["state"]


def _failed(job: dict[str, Any]) -> bool:
    """Whether a job, as stored fields or as_dict(), is done with an error."""
    return job.get("state") == JOB_STATE_DONE and job.get("error") is not None


def _matches(fields: dict[str, Any], state: str | None, task_name: str | None) -> bool:
    """Whether stored fields pass list_jobs' filters."""
    if task_name is not None and fields.get("task") != task_name:
        return False
    if state == "failed":
        return _failed(fields)
    return state is None or fields.get("state") == state


def _minutes(now_ms: int) -> list[int]:
    """The starts, in ms, of the 15 minutes to ``now_ms`` (the current one last), for stats."""
    this_minute = now_ms // 60_000 * 60_000
    return [this_minute - 60_000 * back for back in range(14, -1, -1)]


def _timings(metrics: dict[str, Any]) -> list[str]:
    """A task's run-time and queue-wait p50, p95 and p99 as text, for the CLI and the dashboard."""
    values = (metrics[kind][q] for kind in ("run_seconds", "wait_seconds") for q in ("p50", "p95", "p99"))
    return ["" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
            for value in values]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError("not a JSON object")
    return value


def _id_list(value: Any) -> list[str]:
    """Job ids as stored: a list, or its JSON text."""
    ids = json.loads(value) if isinstance(value, str) else value
    if not isinstance(ids, list) or not all(isinstance(job_id, str) for job_id in ids):
        raise TypeError("not a list of job ids")
    return ids


def _dependency_ids(depends_on: Dependencies) -> tuple[str, ...]:
    """The ids depends_on names, each once, in the order given; TypeError for anything else."""
    if depends_on is None:
        return ()
    given = [depends_on] if isinstance(depends_on, (Job, str)) else list(depends_on)
    ids = []
    for dependency in given:
        if not isinstance(dependency, (Job, str)) or not dependency:
            raise TypeError(f"depends_on takes jobs or their ids, not {dependency!r}")
        ids.append(dependency.id if isinstance(dependency, Job) else dependency)
    return tuple(dict.fromkeys(ids))


def _check_outcome(outcome: str) -> str:
    if outcome not in OUTCOMES:
        raise ValueError("not an outcome")
    return outcome


def _state(state: str) -> str:
    if state not in (JOB_STATE_DEFERRED, JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, JOB_STATE_DONE):
        raise ValueError("not a job state")
    return state


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _time(ms: Any) -> datetime | None:
    """Turn stored milliseconds since the epoch into an aware UTC datetime."""
    if ms is None or ms == "":
        return None
    try:
        return datetime.fromtimestamp(int(ms) / 1000, timezone.utc)
    except (OverflowError, OSError):
        raise ValueError(f"{ms} ms is out of range") from None


# What Queue._decode reads from a stored job, and how; every other field it passes over.
_DECODED_FIELDS: dict[str, Callable[[Any], Any]] = {
    "task": str, "params": _json_object, "state": _state, "enqueued": _time, "started": _time, "done": _time,
    "attempt": int, "due": _time, "outcome": _check_outcome, "stack": str, "result": json.loads, "error": str,
    "progress": json.loads, "traceback": str, "time_limit": float, "priority": int, "unique_key": str,
    "depends_on": _id_list}


def _delay(delay: float | None, eta: datetime | None, clock_ms: Callable[[], int]) -> float:
    """Seconds from now (by ``clock_ms``) until a job may start, from enqueue's ``delay`` or ``eta``."""
    if eta is not None:
        if delay is not None:
            raise ValueError("pass delay or eta, not both")
        if eta.tzinfo is None:
            raise ValueError("eta must be a timezone-aware datetime")
        return max(eta.timestamp() - clock_ms() / 1000, 0.0)
    return max(delay or 0.0, 0.0)


class _Batch(NamedTuple):
    """What a backend's _insert stores along with each job's params and unique key."""

    task: str
    stack: str
    waiter_timeout: float | None     # set for enqueue_wait: the job is awaited
    delay: float                     # seconds before it may start
    time_limit: float | None         # the jobs' own (0: none); None: their task's
    priority: int
    depends_on: tuple[str, ...] = ()  # ids of the jobs each of them waits for, in the order given
    allow_failure: bool = False      # released however they end, not only by their successes


# -- periodic jobs: cron expressions and schedules ----------------------------

_MONTHS = {
    name: number
    for number, name in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1
    )
}
_WEEKDAYS = {name: number for number, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_NO_NAMES: dict[str, int] = {}
# Name, lowest and highest value, accepted names. Day-of-week allows 7 as a second spelling of Sunday.
_FIELDS = (
    ("minute", 0, 59, _NO_NAMES),
    ("hour", 0, 23, _NO_NAMES),
    ("day-of-month", 1, 31, _NO_NAMES),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _WEEKDAYS),
)
# Leap days can be 8 years apart (2096 -> 2104, as 2100 is not a leap year); no satisfiable
# expression has a longer gap, so searching further than this would only loop forever.
_SEARCH_YEARS = 8


def _value(text: str, names: dict[str, int]) -> int:
    """Convert one number or name to its integer value."""
    if text.upper() in names:
        return names[text.upper()]
    # isdigit() alone also accepts non-ASCII digits such as superscripts, which int() rejects.
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(f"has unknown value {text!r}" if text else "has an empty part")


def _parse_field(text: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    """Expand one field into the set of values it allows."""
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = _value(step_text, _NO_NAMES) if slash else 1
        if step == 0:
            raise ValueError("has step 0")
        if base == "*":
            start, end = low, high
        else:
            start_text, dash, end_text = base.partition("-")
            start = _value(start_text, names)
            # A bare 'a/n' runs from a through the field's maximum.
            end = _value(end_text, names) if dash else (high if slash else start)
        if not (low <= start <= high and low <= end <= high):
            raise ValueError(f"is out of range {low}-{high}")
        if start > end:
            raise ValueError(f"has range {start}-{end} whose start is after its end")
        values.update(range(start, end + 1, step))
    return values


class _Cron:
    """A parsed 5-field cron expression ("minute hour day-of-month month day-of-week"), in UTC."""

    def __init__(self, expression: str) -> None:
        """Parse the expression; raise ValueError naming the bad field, or if it can never fire."""
        self._expression = expression
        texts = expression.split()
        if len(texts) != len(_FIELDS):
            raise ValueError(
                f"cron expression {expression!r}: expected 5 fields "
                f"(minute hour day-of-month month day-of-week), got {len(texts)}"
            )
        parsed = []
        for text, (name, low, high, names) in zip(texts, _FIELDS):
            try:
                parsed.append(_parse_field(text, low, high, names))
            except ValueError as error:
                raise ValueError(f"cron expression {expression!r}: {name} field {text!r} {error}") from None
        self._minutes, self._hours, self._days, self._months, weekdays = parsed
        self._weekdays = {day % 7 for day in weekdays}
        # Vixie cron: when both day fields are restricted, a day matching either one is enough.
        self._day_either = not texts[2].startswith("*") and not texts[4].startswith("*")
        # Fail at registration rather than at first scheduling for expressions such as Feb 30.
        self.next_after(datetime(2000, 1, 1, tzinfo=timezone.utc))

    def __str__(self) -> str:
        """Return the original expression."""
        return self._expression

    def __repr__(self) -> str:
        """Return a constructor-style representation."""
        return f"_Cron({self._expression!r})"

    def _day_matches(self, when: datetime) -> bool:
        """Apply the day-of-month / day-of-week rule to the date of when."""
        in_month = when.day in self._days
        in_week = when.isoweekday() % 7 in self._weekdays  # isoweekday() numbers Sunday 7, cron 0
        return (in_month or in_week) if self._day_either else (in_month and in_week)

    def next_after(self, moment: datetime) -> datetime:
        """Return the first matching minute strictly after the aware datetime moment, in UTC."""
        if moment.utcoffset() is None:
            raise ValueError(f"cron expression {self._expression!r}: next_after needs an aware datetime")
        start = moment.astimezone(timezone.utc).replace(second=0, microsecond=0)
        when = start + timedelta(minutes=1)
        # Skip whole months, days and hours that cannot match; only step minutes within a matching hour.
        while when.year <= start.year + _SEARCH_YEARS:
            if when.month not in self._months:
                when = (when.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_matches(when):
                when = when.replace(hour=0, minute=0) + timedelta(days=1)
            elif when.hour not in self._hours:
                when = when.replace(minute=0) + timedelta(hours=1)
            elif when.minute not in self._minutes:
                when += timedelta(minutes=1)
            else:
                return when
        raise ValueError(f"cron expression {self._expression!r} never matches within {_SEARCH_YEARS} years")


class _Schedule:
    """A periodic job: its task, params and when it is due, a cron expression or every so many
    seconds (ticks at the multiples of that interval since the epoch, the same for every worker)."""

    def __init__(self, name: str, task: str, cron: str | None, every: float | None,
                 params: JobParams | None, unique_key: str | None) -> None:
        _check_task_name(task)
        if (cron is None) == (every is None):
            raise ValueError("a schedule takes a cron expression or every=seconds: one of them")
        if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                                  or every < 0.001):
            raise ValueError(f"every must be a number of seconds of at least 0.001, not {every!r}")
        self.name, self.task, self.every, self.unique_key = name, task, every, unique_key
        self.cron = None if cron is None else _Cron(cron)
        self.params = _encoded_params(params)
        self.expression = str(cron) if every is None else f"every {every:g}s"

    def tick_after(self, ms: int) -> int:
        """The first tick strictly after ``ms`` milliseconds since the epoch, in the same unit."""
        if self.cron is None:
            step = round(self.every * 1000)  # type: ignore[operator]
            return (ms // step + 1) * step
        moment = _time(ms)
        assert moment is not None
        return round(self.cron.next_after(moment).timestamp() * 1000)


_THIS_FILE = os.path.normcase(__file__)


def _in_this_file(frame: types.FrameType) -> bool:
    return _origin(frame.f_code.co_filename) == "here"


@functools.cache
def _origin(filename: str) -> str:
    """Whose code a file holds: "here" (this file's), "library" (the standard library's or an
    installed package's) or "user". Asked of each frame of each enqueue, so kept."""
    import sysconfig

    if os.path.normcase(filename) == _THIS_FILE:
        return "here"
    library = tuple({path for name in ("stdlib", "platstdlib", "purelib", "platlib")
                     if (path := sysconfig.get_paths().get(name))})
    return "library" if filename.startswith(library) else "user"


def _enqueue_stack() -> str:
    """Describe the caller's stack, innermost frames kept within STACK_TRACE_LIMIT.

    The frames worth reading are the user's: this library's own are left out,
    and so are those of the standard library and of installed packages (a web
    framework, a server), unless no other frame is left. The command line's
    enqueue says so. Only file, line and function are written: reading source
    lines (as the traceback module does) would cost more than the enqueue itself.
    """
    frames, own = [], []
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is main.__code__:
            return "  enqueued by the command line: python -m monsterqueue enqueue\n"
        origin = _origin(code.co_filename)
        if origin != "here":
            frames.append(frame)
            if origin == "user":
                own.append(frame)
        frame = frame.f_back
    lines: list[str] = []
    size = 0
    for frame in own or frames:
        code = frame.f_code
        line = f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n'
        size += len(line.encode())
        if size > STACK_TRACE_LIMIT:
            break
        lines.append(line)
    return "".join(reversed(lines))


class _ServerGuard:
    """A context that turns the driver's connection errors into ServerUnavailableError, or
    OutcomeUnknownError when the request was sent and no answer came. Not a generator's
    context: one is entered a few times a job, and this costs a tenth of that."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        queue = self.queue
        if exc is None or not isinstance(exc, queue._server_errors):
            return
        if queue._answer_lost(exc):
            raise OutcomeUnknownError(
                f"the queue's server at {queue._address} was sent the request but did not answer "
                f"({exc}): it may have been carried out, and retrying it may do it twice") from exc
        raise ServerUnavailableError(f"can't reach the queue's server at {queue._address}: "
                                     f"{_describe(exc)}; the request was not carried out") from exc


class _Outage:
    """Paces a worker while its server is away: logs once when it goes, once when it's back."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._lock = threading.Lock()
        self._since: float | None = None
        self._pause = OUTAGE_PAUSES[0]

    def failed(self, exc: BaseException) -> float:
        """Note a failed call; return how long to wait before the next one."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                logger.warning("%s; retrying until it answers", exc)
            else:
                self._pause = min(self._pause * 2, OUTAGE_PAUSES[1])
            return self._pause

    def recovered(self) -> None:
        if self._since is None:
            return
        with self._lock:
            if self._since is not None:
                logger.warning("the queue's server at %s answers again after %.1fs",
                               self._queue._address, time.monotonic() - self._since)
            self._since = None
            self._pause = OUTAGE_PAUSES[0]


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
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this backend needs the {module!r} package: "
                          f"pip install monsterqueue[{extra}]") from exc


# ---------------------------------------------------------------------------
# The worker: what process_loop runs
# ---------------------------------------------------------------------------

# What replaces an interrupted job's thread records: the job, its error, whether it may be
# retried, where it was, and whether it was cancelled.
_Interrupted = tuple[Job, str, bool, "traceback.StackSummary | None", bool]


class _Run:
    """One delivery of a job on a worker: what the worker keeps while it runs."""

    __slots__ = ("began", "coroutine", "deadline", "interrupted", "reported", "thread", "worker")

    def __init__(self, worker: _Worker, deadline: float) -> None:
        self.worker = worker
        self.thread: int | None = None   # the thread inside the task's run(), guarded by _thread_lock
        self.coroutine: Any = None       # or the asyncio task running an async task's run()
        self.began = 0.0                 # time.monotonic() when its run began
        self.deadline = deadline         # time.monotonic() at which its time is up
        self.interrupted = False         # timed out or cancelled: its thread was replaced
        self.reported = False            # its outcome was given, by the task or by the worker

    def report(self) -> bool:
        """Take the one right to report the outcome: the task's thread and the worker that
        interrupts it may both try, and one wins."""
        with self.worker._report_lock:
            if self.reported:
                return False
            self.reported = True
            return True


class _Worker:
    """The runtime of one process_loop: threads and an event loop that run a queue's jobs,
    the heartbeat that keeps their leases, the timer of their time limits and the scheduler
    of its periodic jobs. It calls the queue's storage primitives with what they need.

    Lock order, outermost first: _idle, _report_lock, _thread_lock. None is held while the
    server is called, but for the claim's Condition wait in the memory backend.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self.ended = threading.Event()        # set once process_loop has returned
        self._thread_id = threading.get_ident()
        self._tasks = queue._tasks            # read as they are: a task registered later runs too
        self._async_tasks = queue._async_tasks
        self._idle = threading.Condition()   # guards _held, _async_held, _threads; signalled when a job ends
        self._held: dict[str, Job] = {}      # jobs running on its threads and loop
        self._async_held = 0                 # how many of them run on the event loop
        self._threads: list[threading.Thread] = []
        self._inbox: SimpleQueue[Job | None] = SimpleQueue()
        self._report_lock = threading.Lock()  # guards _Run.reported
        # Guards _Run.thread, coroutine and interrupted. A plain lock, unlike the Condition
        # above: its acquire and release are C calls, so an interrupt can't land between
        # them and leave it held.
        self._thread_lock = threading.Lock()
        self._wake_timer = threading.Event()  # a job with an earlier deadline started
        self._next_deadline = 0.0             # time.monotonic() the timer thread wakes at
        self._event_loop: Any = None          # the asyncio loop, once an async job ran
        self._loop_runner: threading.Thread | None = None
        self._loop_seen = 0.0                 # time.monotonic() when that loop last ran its check
        self._loop_warned = 0.0               # _loop_seen when the timer last warned of a block
        self._misfit: ValueError | None = None  # a claim's refusal of this queue: run() raises it

    def run(self) -> None:
        queue, stopping = self.queue, self.stopping
        try:
            with queue._server:
                queue._check_fit()  # now: a worker that runs no task claims nothing
        except ServerUnavailableError:
            pass  # each claim checks it again
        except ValueError as exc:
            self._misfit = exc
            stopping.set()
        for _ in range(queue.concurrency):
            self._add_thread(None)
        drained = threading.Event()  # set once the last running job has ended
        helpers = [threading.Thread(target=target, args=(until,), name=f"monsterqueue-{name}", daemon=True)
                   for name, target, until in (("heartbeat", self._beat, drained),
                                               ("timer", self._time, drained),
                                               ("scheduler", self._fire_schedules, self.stopping))
                   if name != "scheduler" or queue._schedules]
        for helper in helpers:
            helper.start()
        try:
            while not stopping.is_set():
                names, free = self._wait_for_free_slots()
                if not free:
                    stopping.wait(0 if stopping.is_set() or self._tasks else IDLE_WAKE_INTERVAL)
                    continue
                try:
                    with queue._server:  # each job starts as soon as it is claimed
                        for job_id, fields in queue._claim(names, free, self.id, IDLE_WAKE_INTERVAL,
                                                           stopping):
                            self._start(job_id, fields)
                except ServerUnavailableError as exc:
                    stopping.wait(queue._outage.failed(exc))
                    continue
                except ValueError as exc:  # this queue object doesn't fit the stored queue
                    self._misfit = exc
                    break
                except Exception:  # a server error (out of memory, say): back off, don't die
                    logger.exception("claiming jobs failed; retrying")
                    stopping.wait(IDLE_WAKE_INTERVAL)
                    continue
                queue._outage.recovered()
        finally:
            stopping.set()  # also when an error ends the loop
            # Leases and time limits go on while the running jobs finish.
            self.wait()
            with self._idle:
                threads = list(self._threads)
            for _ in threads:
                self._inbox.put(None)
            for thread in threads:
                thread.join()
            drained.set()
            self._wake_timer.set()
            with contextlib.suppress(Exception), queue._server:
                queue._interrupt_claim(self.id)  # the heartbeat waits for cancels: it ends now
            for helper in helpers:
                helper.join()
            self._close_loop()
            # Else it is dropped WORKER_ALIVE_LEASES leases later.
            with contextlib.suppress(Exception), queue._server:
                queue._retire(self.id)
        logger.info("worker %s stopped", self.id)
        if self._misfit is not None:
            raise self._misfit

    def stop(self) -> None:
        self.stopping.set()
        with self._idle:
            self._idle.notify_all()
        with contextlib.suppress(*self.queue._server_errors):
            self.queue._interrupt_claim(self.id)
        if self._thread_id != threading.get_ident():
            self.ended.wait()

    def wait(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._held)

    # -- places for jobs ---------------------------------------------------------

    def _free(self) -> tuple[int, int]:
        """How many more jobs of sync tasks and of async tasks this worker can start now."""
        return (self.queue.concurrency - (len(self._held) - self._async_held),
                self.queue.async_concurrency - self._async_held)

    def _wait_for_free_slots(self) -> tuple[list[str], int]:
        """Wait until a job can start; return the tasks whose jobs can, and how many may be claimed
        (for both kinds, no more than either can start: never claim a job nobody can run)."""
        sync_names = [name for name in self._tasks if name not in self._async_tasks]
        async_names = [name for name in self._tasks if name in self._async_tasks]
        stopping = self.stopping

        def free() -> tuple[int, int]:  # places for the kinds of tasks this worker runs
            threads, coroutines = self._free()
            return threads if sync_names else 0, coroutines if async_names else 0
        with self._idle:
            self._idle.wait_for(lambda: max(free()) > 0 or stopping.is_set() or not self._tasks)
            # Short jobs free their threads one at a time: wait a moment for half of them,
            # to claim them in one round trip and wake this loop once, not once per job.
            batch = max(self.queue.concurrency // 2, 1)
            if not async_names and free()[0] < batch:
                self._idle.wait_for(lambda: free()[0] >= batch or stopping.is_set(), CLAIM_LINGER)
            threads, coroutines = free()
        if stopping.is_set():
            return [], 0
        if threads > 0 and coroutines > 0:
            return sync_names + async_names, min(threads, coroutines)
        return (sync_names, threads) if threads > 0 else (async_names, coroutines)

    def _release(self, job: Job) -> None:
        """Take an ended or interrupted job off this worker, and wake the loop if it may be
        waiting: for a first free place, or for a batch of them. Call it holding _idle."""
        if self._held.get(job.id) is not job:
            return  # a retried job may be claimed again before this run ends: leave its new entry
        del self._held[job.id]
        if job.task_name in self._async_tasks:
            self._async_held -= 1
            free, size = self._free()[1], self.queue.async_concurrency
        else:
            free, size = self._free()[0], self.queue.concurrency
        if free in (1, max(size // 2, 1)) or not self._held:
            self._idle.notify_all()

    def _start(self, job_id: str, fields: dict[str, Any]) -> None:
        try:
            job = self.queue._decode(job_id, fields)
        except MalformedJobError as exc:
            logger.error("%s", exc)
            job = Job(self.queue, job_id, "", {}, JobStatus(JOB_STATE_RUNNING, None), "",
                      delivery=_int(fields.get("delivery")))
            job._report(None, str(exc), retryable=False)
            return
        limit = self.queue._time_limit_of(job)
        job._run = run = _Run(self, time.monotonic() + limit if limit else math.inf)
        coroutine = job.task_name in self._async_tasks
        with self._idle:
            earlier = self._held.get(job_id)  # a run of it whose lease ran out, redelivered here
            if earlier is not None and earlier.task_name in self._async_tasks:
                self._async_held -= 1  # its entry is replaced: _release will skip it
            self._held[job_id] = job
            self._async_held += coroutine
        if run.deadline < self._next_deadline:
            self._wake_timer.set()
        if coroutine:
            self._loop().call_soon_threadsafe(self._spawn, job)
        else:
            self._inbox.put(job)

    # -- jobs on threads -----------------------------------------------------------

    def _add_thread(self, interrupted: _Interrupted | None,
                    serves: bool = True) -> None:
        """Start a worker thread; one that replaces an interrupted job's thread records its outcome
        first. One that ``serves`` no jobs only records it (an interrupted coroutine's)."""
        thread = threading.Thread(target=self._serve, args=(interrupted, serves), name="monsterqueue",
                                  daemon=True)
        with self._idle:
            self._threads.append(thread)
        thread.start()

    def _serve(self, interrupted: _Interrupted | None,
               serves: bool) -> None:
        """Run the jobs handed to this thread until it is handed None, or replaced."""
        if interrupted is not None:
            job, error, retryable, stack, cancelled = interrupted
            trace = None if stack is None else _bounded_traceback(
                ["Traceback (most recent call last):\n", *stack.format(), f"{error}\n"])
            try:
                self.queue._report(job, None, error, retryable, trace, cancelled)
            except Exception:  # the server refused it (out of memory, say): the lease decides
                logger.exception("job %s: outcome not recorded", job.id)
        while serves:
            next_job = self._inbox.get()
            if next_job is None:
                return
            job = next_job
            try:
                self._run(job)
            except (TimeLimitExceeded, JobCancelledError):
                pass  # raised just as the task ended: the interrupting side records the outcome
            except Exception:  # a report the server refused: the thread must live on
                logger.exception("job %s: outcome not recorded", job.id)
            if job._run is not None and job._run.interrupted:
                return  # another thread took this one's place

    def _run(self, job: Job) -> None:
        run = job._run
        assert run is not None
        run.began = time.monotonic()
        logger.info("job %s (%s) started", job.id, job.task_name)
        try:
            try:
                with self._thread_lock:
                    if run.interrupted:  # cancelled or timed out before it began
                        return
                    run.thread = threading.get_ident()
                self._tasks[job.task_name].run(job)
            finally:
                with self._thread_lock:  # from here on no interrupt is raised in this thread
                    run.thread = None
        except BaseException as exc:  # a task must never take its worker down
            self._ran(job, exc)
        else:
            self._ran(job, None)

    def _ran(self, job: Job, exc: BaseException | None) -> None:
        """Record how a run ended: its exception, or no result if the task reported none (and
        nothing if it was interrupted, which recorded it); then free its place."""
        try:
            if exc is None:
                job._report(None, NO_RESULT_SET, retryable=False)  # a no-op if the task reported
            else:
                if job._run is None or not job._run.interrupted:
                    logger.error("task %s failed on job %s", job.task_name, job.id, exc_info=exc)
                job.error(exc)  # a no-op if interrupted
        finally:
            with self._idle:
                self._release(job)

    # -- async def tasks, on the worker's event loop --------------------------------

    def _loop(self) -> Any:
        """The worker's event loop, started on its own thread the first time a coroutine runs."""
        if self._event_loop is None:
            import asyncio

            self._event_loop = asyncio.new_event_loop()
            self._loop_runner = threading.Thread(target=self._event_loop.run_forever,
                                                 name="monsterqueue-loop", daemon=True)
            self._loop_runner.start()
            self._event_loop.call_soon_threadsafe(self._loop_check, self._event_loop)
        return self._event_loop

    def _loop_check(self, loop: Any) -> None:
        """Note that the loop runs, again and again: the timer thread reads it to tell a blocked loop."""
        self._loop_seen = time.monotonic()
        loop.call_later(LOOP_BLOCKED_WARNING / 5, self._loop_check, loop)

    def _close_loop(self) -> None:
        if self._event_loop is None or self._loop_runner is None:
            return
        loop, self._event_loop = self._event_loop, None
        loop.call_soon_threadsafe(loop.stop)
        self._loop_runner.join(IDLE_WAKE_INTERVAL)
        if self._loop_runner.is_alive():  # a coroutine blocks it (interrupted long since)
            logger.error("the event loop of the async tasks is still blocked: left behind")
        else:
            loop.close()

    def _spawn(self, job: Job) -> None:
        run = job._run
        assert run is not None
        with self._thread_lock:  # guards coroutine and interrupted, as for threads
            if not run.interrupted:
                run.coroutine = self._event_loop.create_task(self._arun(job))

    async def _arun(self, job: Job) -> None:
        """Run a job of an async task: the twin of _run for coroutines, cancelled where _run's
        thread has an exception raised in it."""
        assert job._run is not None
        job._run.began = time.monotonic()
        logger.info("job %s (%s) started", job.id, job.task_name)
        try:
            await self._tasks[job.task_name].run(job)  # type: ignore[misc]
        except BaseException as exc:  # CancelledError too: interrupted, or by the task's own code
            self._ran(job, exc)
        else:
            self._ran(job, None)

    # -- interrupting: time limits and cancels ----------------------------------------

    def _interrupt(self, job: Job, exception: type[BaseException], error: str, retryable: bool) -> None:
        """Raise ``exception`` in a running job's thread, and replace that thread with one that
        records ``error`` as the job's outcome; or cancel the coroutine of an async one, and
        record it on a thread of its own.

        The exception is raised when the thread next runs Python code: a task
        blocked in C (a long sleep, a socket read) keeps its thread until it
        returns, but not its place: its outcome is recorded now, and whatever it
        reports later is discarded.
        """
        run = job._run
        assert run is not None
        with self._idle:
            with self._report_lock:
                if self._held.get(job.id) is not job or run.reported:
                    return  # it ended, or reported its outcome, meanwhile
                run.reported = True
            self._release(job)
            stack = None
            with self._thread_lock:
                run.interrupted = True
                if run.coroutine is not None:
                    stack = _task_frames([(frame, frame.f_lineno) for frame in run.coroutine.get_stack()])
                    self._event_loop.call_soon_threadsafe(run.coroutine.cancel)
                elif run.thread is not None:
                    frame = sys._current_frames().get(run.thread)
                    if frame is not None:  # where it was: read now, formatted by the new thread
                        stack = _task_frames(list(traceback.walk_stack(frame))[::-1])
                    _raise_in_thread(run.thread, exception)
                    self._threads = [thread for thread in self._threads if thread.ident != run.thread]
            # Added before the loop can see the job gone, so that its shutdown waits for the report.
            self._add_thread((job, error, retryable, stack, exception is JobCancelledError),
                             serves=job.task_name not in self._async_tasks)
            self._idle.notify_all()
        logger.warning("job %s (%s) interrupted: %s", job.id, job.task_name, error)

    def _time(self, drained: threading.Event) -> None:
        """Interrupt each running job at its time limit, until the loop has drained."""
        while not drained.is_set():
            self._wake_timer.clear()
            with self._idle:
                now = time.monotonic()
                deadlines = {job: job._run.deadline for job in self._held.values() if job._run is not None}
                late = [job for job, deadline in deadlines.items() if deadline <= now]
                # It wakes at least this often anyway: a job starting with a later deadline,
                # as most do, needn't wake it.
                self._next_deadline = min([deadline for deadline in deadlines.values() if deadline > now]
                                          + [now + IDLE_WAKE_INTERVAL])
            for job in late:
                self._interrupt(job, TimeLimitExceeded, "TimeLimitExceeded: the job ran past its time "
                                f"limit of {self.queue._time_limit_of(job):g}s", True)
            self._warn_if_loop_blocked(now)
            self._wake_timer.wait(self._next_deadline - now)

    def _warn_if_loop_blocked(self, now: float) -> None:
        """Log the job whose coroutine holds the event loop, when it has held it too long:
        blocking code in a coroutine (time.sleep, a sync client) stalls every async job."""
        blocked = now - self._loop_seen
        loop = self._event_loop
        if loop is None or blocked < LOOP_BLOCKED_WARNING or self._loop_seen == self._loop_warned:
            return
        self._loop_warned = self._loop_seen  # once per blocking
        import asyncio

        running = asyncio.current_task(loop)
        culprits = [job for job in list(self._held.values())
                    if job._run is not None and job._run.coroutine is running]
        logger.warning("the event loop has been blocked for %.1fs by %s: a coroutine that calls "
                       "blocking code (time.sleep, a sync client) stalls every async job", blocked,
                       f"job {culprits[0].id} of task {culprits[0].task_name}" if culprits else "a coroutine")

    # -- the heartbeat and the scheduler ---------------------------------------------

    def _beat(self, drained: threading.Event) -> None:
        """Every third of a lease, and at once when the server pushes a cancel of one of its
        jobs: renew this worker's leases, requeue expired ones and interrupt the jobs cancelled
        meanwhile. Every PROGRESS_INTERVAL: store the progress set since."""
        queue = self.queue
        next_beat = 0.0
        stored: dict[str, str] = {}  # job id -> the progress text last stored
        while True:
            with self._idle:
                held = {job.id: job for job in self._held.values()}
            progress = {job: job._progress_text for job in held.values()
                        if job._progress_text is not None and job._progress_text is not stored.get(job.id)}
            try:
                with queue._server:  # the leases first: progress that can't be stored must not stop them
                    if time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + queue.lease_timeout / 3
                        for job_id in queue._heartbeat(self.id, list(held.values())):
                            self._interrupt(held[job_id], JobCancelledError, CANCELLED_WHILE_RUNNING, False)
                    if progress:
                        queue._save_progress(progress)
                    stored = {job_id: stored[job_id] for job_id in held if job_id in stored}
                    stored.update((job.id, text) for job, text in progress.items())
            except ServerUnavailableError as exc:
                queue._outage.failed(exc)
            except Exception:  # an out-of-memory server, a bad record: leases must go on
                logger.exception("heartbeat of worker %s failed; retrying", self.id)
            wait = min(PROGRESS_INTERVAL, max(next_beat - time.monotonic(), 0))
            try:
                with queue._server:
                    if queue._await_cancel(self.id, wait):
                        next_beat = 0.0
            except Exception:  # the server is away: the heartbeat says so
                drained.wait(wait)
            if drained.is_set():
                return

    def _fire_schedules(self, stopping: threading.Event) -> None:
        """Fire the queue's schedules at their ticks until stop(), racing the other workers
        that run them: the server lets one job per tick through."""
        schedules = self.queue._schedules
        ticks = {name: self._fire_tick(schedule, None) for name, schedule in schedules.items()}
        while True:
            name, tick = min(ticks.items(), key=lambda item: item[1])
            if stopping.wait(max(tick - self.queue._clock_ms(), 0) / 1000):
                return
            ticks[name] = self._fire_tick(schedules[name], tick)

    def _fire_tick(self, schedule: _Schedule, tick: int | None) -> int:
        """Fire one tick of a schedule (None: only record it) and return the next; log missed ones."""
        queue = self.queue
        next_tick = schedule.tick_after(max(queue._clock_ms(), tick or 0))
        # The job's enqueue stack says which schedule and tick enqueued it.
        batch = _Batch(schedule.task, f"periodic {schedule.name!r}, tick {_iso(_time(tick))}\n", None, 0.0,
                       None, self._tasks[schedule.task].priority)
        try:
            with queue._server:
                job_id, last = queue._fire(schedule, tick, next_tick, batch)
        except Exception as exc:
            logger.error("schedule %s: the tick of %s was not fired: %s", schedule.name,
                         _iso(_time(tick)), exc)
            return next_tick
        if job_id is not None:
            logger.info("schedule %s: job %s for the tick of %s", schedule.name, job_id, _iso(_time(tick)))
        # Ticks before this one (or, at start, before the last second) that nobody fired.
        missed = None if last is None else schedule.tick_after(last)
        if missed is not None and missed < (tick or queue._clock_ms() - 1000):
            logger.warning("schedule %s skipped its ticks from %s to before %s: no worker ran then",
                           schedule.name, _iso(_time(missed)), _iso(_time(tick or next_tick)))
        return next_tick


# ---------------------------------------------------------------------------
# MemoryQueue: in-process, for tests and the demo
# ---------------------------------------------------------------------------

class MemoryQueue(Queue):
    """A queue held in this process's memory, shared by its threads; nothing persists.

    Its workers live and die with the process, so it needs no leases.
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._changed = threading.Condition()          # guards everything below
        self._jobs: dict[str, dict[str, Any]] = {}     # id -> stored fields, insertion ordered
        # Per task, a heap of (-priority, number, id): higher priority first, then oldest.
        self._ready: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
        self._scheduled: list[tuple[int, str]] = []    # heap of (due ms, id)
        self._unique: dict[tuple[str, str], str] = {}  # (task, unique key) -> the id that holds it
        self._schedules_fired: dict[str, dict[str, Any]] = {}  # schedule name -> its record
        self._async_waiters: dict[str, tuple[Any, Any]] = {}  # id -> (event loop, future) of an a* waiter
        self._workers: dict[str, tuple[int, list[str]]] = {}  # worker -> (last seen ms, tasks)
        self._metrics: collections.Counter[str] = collections.Counter()  # see _observe
        self._ids = itertools.count(1)
        self._woken: set[str] = set()  # workers told of a cancel, or to stop waiting for one

    def _insert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        now = _now_ms()
        due = now + round(batch.delay * 1000) if batch.delay else None
        enqueued = _time(now)
        assert enqueued is not None
        stored: list[tuple[str, datetime, datetime | None, dict[str, Any] | None]] = []
        with self._changed:
            missing = [job_id for job_id in batch.depends_on if job_id not in self._jobs]
            if missing:
                raise NoSuchJobError(f"no job {missing[0]} to depend on")
            for text, unique_key in jobs:
                holder = self._unique.get((batch.task, unique_key)) if unique_key else None
                if holder is not None:
                    stored.append((holder, enqueued, None, dict(self._jobs[holder])))
                    continue
                job_id = str(next(self._ids))
                self._jobs[job_id] = {"task": batch.task, "params": text, "state": JOB_STATE_ENQUEUED,
                                      "enqueued": now, "stack": batch.stack, "delivery": 0, "attempt": 1,
                                      "waiter": batch.waiter_timeout is not None, "due": due,
                                      "time_limit": batch.time_limit, "priority": batch.priority,
                                      "unique_key": unique_key}
                if unique_key:
                    self._unique[batch.task, unique_key] = job_id
                if batch.depends_on:
                    self._defer(job_id, batch)
                    stored.append((job_id, enqueued, _time(due), dict(self._jobs[job_id])))
                else:
                    self._make_ready(job_id, due)
                    stored.append((job_id, enqueued, _time(due), None))
            self._changed.notify_all()
        return stored

    def _defer(self, job_id: str, batch: _Batch) -> None:
        fields = self._jobs[job_id]
        fields.update(state=JOB_STATE_DEFERRED, depends_on=list(batch.depends_on),
                      allow_failure=batch.allow_failure, waiting=set(batch.depends_on))
        for dependency in batch.depends_on:
            parent = self._jobs[dependency]
            parent.setdefault("dependents", []).append(job_id)
            if parent["state"] == JOB_STATE_DONE:
                self._settle([(dependency, parent["outcome"], [job_id])])

    def _settle(self, ended: list[tuple[str, str, list[str]]]) -> None:
        """Settle the dependents of each (job, how it ended, its dependents), and theirs in
        turn when cancelled: a list worked through, not a recursion, however deep the graph."""
        while ended:
            dependency, outcome, dependents = ended.pop()
            for job_id in dependents:
                fields = self._jobs.get(job_id)
                if (fields is None or fields["state"] != JOB_STATE_DEFERRED
                        or dependency not in fields["waiting"]):
                    continue
                fields["waiting"].discard(dependency)
                if outcome != "succeeded" and not fields["allow_failure"]:
                    self._end(job_id, None, DEPENDENCY_ENDED % (dependency, outcome), None, "cancelled")
                    self._hand_over(job_id)
                    ended.append((job_id, "cancelled", fields.get("dependents", [])))
                elif not fields["waiting"]:
                    fields["state"] = JOB_STATE_ENQUEUED
                    due = fields["due"]
                    self._make_ready(job_id, due if due is not None and due > _now_ms() else None)
        self._changed.notify_all()

    def _make_ready(self, job_id: str, due: int | None) -> None:
        fields = self._jobs[job_id]
        if due is None:
            heapq.heappush(self._ready[fields["task"]], (-fields["priority"], int(job_id), job_id))
        else:
            heapq.heappush(self._scheduled, (due, job_id))

    def _fire(self, schedule: _Schedule, tick: int | None, next_tick: int, batch: _Batch
              ) -> tuple[str | None, int | None]:
        with self._changed:
            record = self._schedules_fired.setdefault(schedule.name, {"last": None, "last_job": None})
            record.update(name=schedule.name, task=schedule.task, schedule=schedule.expression,
                          next=next_tick)
            last = record["last"]
            if tick is None or (last is not None and last >= tick):
                return None, last
            ((job_id, *_),) = self._insert(batch, [(schedule.params, schedule.unique_key)])
            record.update(last=tick, last_job=job_id)
            return job_id, last

    def _periodic(self) -> list[Any]:
        with self._changed:
            return [dict(record) for record in self._schedules_fired.values()]

    def _claim(self, task_names: list[str], limit: int, worker: str, block: float,
               stopping: threading.Event) -> list[tuple[str, dict[str, Any]]]:
        with self._changed:
            # stop() notifies under this lock: it comes before the check, or wakes the wait.
            if not stopping.is_set() and not any(self._ready.get(name) for name in task_names):
                wait = block
                if self._scheduled:
                    wait = min(wait, max(self._scheduled[0][0] - _now_ms(), 0) / 1000)
                self._changed.wait(wait)
            now = _now_ms()
            while self._scheduled and self._scheduled[0][0] <= now:
                job_id = heapq.heappop(self._scheduled)[1]
                if job_id in self._jobs:
                    self._make_ready(job_id, None)
            claimed: list[tuple[str, dict[str, Any]]] = []
            while len(claimed) < limit:
                heads = [(self._ready[name][0], name) for name in task_names if self._ready.get(name)]
                if not heads:
                    break
                job_id = heapq.heappop(self._ready[min(heads)[1]])[2]
                fields = self._jobs.get(job_id)
                if fields is None or fields["state"] != JOB_STATE_ENQUEUED:
                    continue  # deleted or cancelled while it waited
                fields.update(state=JOB_STATE_RUNNING, started=now, worker=worker,
                              delivery=fields["delivery"] + 1)
                claimed.append((job_id, dict(fields)))
            return claimed

    def _held_fields(self, job: Job) -> dict[str, Any] | None:
        fields = self._jobs.get(job.id)
        if fields is None or fields["state"] != JOB_STATE_RUNNING or fields["delivery"] != job._delivery:
            return None
        return fields

    def _finish(self, job: Job, result: str | None, error: str | None, traceback: str | None,
                outcome: str) -> bool | None:
        with self._changed:
            fields = self._held_fields(job)
            if fields is None:
                return None
            self._done(job.id, result, error, traceback, outcome)
            if job._progress_text is not None:
                fields["progress"] = job._progress_text
            received = fields["waiter"]
            self._hand_over(job.id)
            return received

    def _hand_over(self, job_id: str) -> None:
        """The job is done: its waiter, if any, gets it (an a* waiter on its own event loop)."""
        self._jobs[job_id]["waiter"] = False
        self._changed.notify_all()
        loop, done = self._async_waiters.pop(job_id, (None, None))
        if loop is not None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    def _done(self, job_id: str, result: str | None, error: str | None, traceback: str | None,
              outcome: str) -> None:
        self._end(job_id, result, error, traceback, outcome)
        self._settle([(job_id, outcome, self._jobs[job_id].get("dependents", []))])

    def _end(self, job_id: str, result: str | None, error: str | None, traceback: str | None,
             outcome: str) -> None:
        fields = self._jobs[job_id]
        self._free_unique_key(job_id)
        now = _now_ms()
        fields.update(state=JOB_STATE_DONE, done=now, outcome=outcome, result=result, error=error,
                      traceback=traceback, worker=None)
        started = fields.get("started")
        _observe(self._metrics, fields["task"], error is not None, started and now - started,
                 started and started - (fields["due"] or fields["enqueued"]))

    def _free_unique_key(self, job_id: str) -> None:
        key = (self._jobs[job_id]["task"], self._jobs[job_id].get("unique_key") or "")
        if self._unique.get(key) == job_id:
            del self._unique[key]

    def _retry(self, job: Job, delay: float, traceback: str | None) -> bool | None:
        with self._changed:
            fields = self._held_fields(job)
            if fields is None:
                return None
            if fields.get("cancel"):
                return False
            due = _now_ms() + round(delay * 1000)
            fields.update(state=JOB_STATE_ENQUEUED, started=None, worker=None, due=due,
                          attempt=fields["attempt"] + 1, traceback=traceback)
            self._make_ready(job.id, due)
            self._changed.notify_all()
            return True

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        with self._changed:
            fields = self._jobs.get(job.id)
            self._changed.wait_for(lambda: fields is None or not fields["waiter"], timeout)
            if fields is None or fields["waiter"]:
                if fields is not None:
                    fields["waiter"] = False
                return None
            return self._decode(job.id, dict(fields))

    async def _ainsert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                       ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        return self._insert(batch, jobs)  # in memory: never waits

    async def _aawait_outcome(self, job: Job, timeout: float) -> Job | None:
        import asyncio

        loop = asyncio.get_running_loop()
        with self._changed:
            fields = self._jobs.get(job.id)
            done = loop.create_future()
            if fields is not None and fields["waiter"]:
                self._async_waiters[job.id] = (loop, done)
            else:  # handed over already, or gone
                done.set_result(None)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done, timeout)
        finally:
            with self._changed:
                self._async_waiters.pop(job.id, None)
        return self._await_outcome(job, 0)  # under the lock: the outcome, or the waiter withdrawn

    async def _aload(self, job_id: str) -> dict[str, Any]:
        return self._load(job_id)

    def _save_progress(self, progress: dict[Job, str]) -> None:
        with self._changed:
            for job, text in progress.items():
                fields = self._held_fields(job)
                if fields is not None:
                    fields["progress"] = text

    def _cancel(self, job_id: str) -> bool:
        with self._changed:
            fields = self._jobs.get(job_id)
            if fields is None:
                raise NoSuchJobError()
            state = fields["state"]
            if state in (JOB_STATE_DEFERRED, JOB_STATE_ENQUEUED):
                self._done(job_id, None, CANCELLED_BEFORE_IT_RAN, None, "cancelled")
                self._hand_over(job_id)
            elif state == JOB_STATE_RUNNING:
                fields["cancel"] = True
                self._woken.add(fields["worker"])
                self._changed.notify_all()
            return state != JOB_STATE_DONE

    def _bulk(self, action: str, state: str, task_name: str | None) -> int:
        with self._changed:
            ids = [job_id for job_id, fields in self._jobs.items() if _matches(fields, state, task_name)]
            for job_id in ids:
                (self._requeue if action == "retry" else self._delete)(job_id)
            return len(ids)

    def _heartbeat(self, worker: str, held: list[Job]) -> list[str]:
        # No lease to renew: a memory queue's jobs can't outlive their worker.
        now = _now_ms()
        with self._changed:
            self._workers[worker] = (now, sorted(self._tasks))
            for name, (seen, _) in list(self._workers.items()):
                if seen < now - WORKER_ALIVE_LEASES * self.lease_timeout * 1000:
                    del self._workers[name]
            if self.result_ttl:
                expired = now - self.result_ttl * 1000
                for job_id in [job_id for job_id, fields in self._jobs.items()
                               if fields["state"] == JOB_STATE_DONE and fields["done"] < expired
                               and not self._needed(fields)]:
                    del self._jobs[job_id]
            return [job.id for job in held if self._jobs.get(job.id, {}).get("cancel")]

    def _needed(self, fields: dict[str, Any]) -> bool:
        """Whether a deferred dependent still waits for this job: its result is kept then."""
        return any(self._jobs.get(job_id, {}).get("state") == JOB_STATE_DEFERRED
                   for job_id in fields.get("dependents", []))

    def _retire(self, worker: str) -> None:
        with self._changed:
            self._workers.pop(worker, None)

    def _interrupt_claim(self, worker: str) -> None:
        with self._changed:
            self._woken.add(worker)
            self._changed.notify_all()

    def _await_cancel(self, worker: str, timeout: float) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: worker in self._woken, timeout)
            if worker not in self._woken:
                return False
            self._woken.discard(worker)
            return True

    def _load(self, job_id: str) -> dict[str, Any]:
        with self._changed:
            if job_id not in self._jobs:
                raise NoSuchJobError()
            return dict(self._jobs[job_id])

    def _dependent_ids(self, job_id: str) -> list[str]:
        with self._changed:
            return list(self._jobs.get(job_id, {}).get("dependents", []))

    def _list(self, state: str | None, task_name: str | None, limit: int | None, offset: int,
              newest_first: bool) -> list[tuple[str, dict[str, Any]]]:
        with self._changed:
            found = [(job_id, fields) for job_id, fields in self._jobs.items()
                     if _matches(fields, state, task_name)]
            if state in (JOB_STATE_DONE, "failed"):  # in the order they were done, as on Redis
                found.sort(key=lambda job: (job[1]["done"], int(job[0])))
            if newest_first:
                found.reverse()
            return [(job_id, dict(fields))
                    for job_id, fields in found[offset:None if limit is None else offset + limit]]

    def _stats(self) -> _Stats:
        minutes = _minutes(self._clock_ms())
        per_minute = [0] * len(minutes)
        counts: collections.Counter[str] = collections.Counter()
        with self._changed:
            for fields in self._jobs.values():
                counts[f"{'failed' if _failed(fields) else fields['state']}:{fields['task']}"] += 1
                if fields["state"] == JOB_STATE_DONE and fields["done"] >= minutes[0]:
                    per_minute[(fields["done"] - minutes[0]) // 60_000] += 1
            workers = [(worker, seen, tasks) for worker, (seen, tasks) in self._workers.items()]
            return list(counts.items()), workers, per_minute, list(self._metrics.items()), []

    def _requeue(self, job_id: str) -> bool:
        with self._changed:
            fields = self._jobs.get(job_id)
            if fields is None:
                raise NoSuchJobError()
            if fields["state"] != JOB_STATE_DONE:
                return False
            # Due now: its queue wait counts from here, not from when it was first enqueued.
            fields.update(dict.fromkeys(REQUEUE_CLEARS), state=JOB_STATE_ENQUEUED, started=None,
                          due=_now_ms(), attempt=1)
            if fields["unique_key"]:  # held again, unless an unfinished job took it meanwhile
                self._unique.setdefault((fields["task"], fields["unique_key"]), job_id)
            self._make_ready(job_id, None)
            self._changed.notify_all()
            return True

    def _delete(self, job_id: str) -> bool:
        with self._changed:
            if job_id not in self._jobs:
                return False
            self._free_unique_key(job_id)
            fields = self._jobs.pop(job_id)  # a claim drops its id from the ready heap
            if fields["state"] != JOB_STATE_DONE:
                self._settle([(job_id, "deleted", fields.get("dependents", []))])
            self._changed.notify_all()
            return True

    def _reset(self) -> None:
        with self._changed:
            self._jobs.clear()
            self._ready.clear()
            self._scheduled.clear()
            self._unique.clear()
            self._schedules_fired.clear()
            self._workers.clear()
            self._metrics.clear()
            self._changed.notify_all()


# ---------------------------------------------------------------------------
# RedisQueue
# ---------------------------------------------------------------------------
#
# Keys, all under one Redis Cluster hash tag so that every script touches one
# slot. The scripts take the prefix and build the keys of a job from its id.
# With shards=N the queue is N such sets of keys, each under a tag of its own
# (see _shard_tags), and each job lives in the shard its id names: every script
# still touches one slot, and every rule holds per shard. Listing, stats and
# the heartbeat visit every shard; an idle worker blocks on all of them.
#
#   {prefix}:seq            counter that numbers the jobs
#   {prefix}:shards         the number of shards the ids are numbered for (first shard only)
#   {prefix}:job:ID         hash of the job's fields (see Queue._decode), plus
#                           waiter (the waiting caller's deadline), worker,
#                           lost (leases lost) and cancel (set while running)
#   {prefix}:jobs           sorted set of every job id, scored by its number
#   {prefix}:task:TASK      the same, of one task's jobs
#   {prefix}:enqueued       the same, of the enqueued jobs (delayed ones too)
#   {prefix}:running        sorted set of claimed ids, scored by lease deadline
#   {prefix}:done           sorted set of "done|failed:TASK:ID", scored by done time:
#                           listing, and the expiry of results
#   {prefix}:counts         hash of "STATE:TASK" -> number of jobs, for stats
#   {prefix}:queue:TASK     sorted set of the ids of one task ready to run, scored by
#                           priority then number (see push)
#   {prefix}:ready:TASK     sorted set with one member while that queue may be
#                           non-empty: idle workers block on it with BZPOPMIN
#   {prefix}:scheduled      sorted set of delayed and retried ids, scored by due time
#   {prefix}:outcome:ID     list where an enqueue_wait caller BLPOPs the outcome
#   {prefix}:workers        hash of worker -> "LAST_SEEN_MS TASKS_JSON"
#   {prefix}:wake:WORKER    sorted set that stop() writes to wake its own worker
#   {prefix}:metrics        hash of the counters and histograms of Python's _observe
#   {prefix}:unique:TASK    hash of unique key -> the id of the unfinished job holding it
#   {prefix}:periodic       hash of schedule name -> its JSON record: task, schedule,
#                           next and last tick, last job
#
# Round trips per job: enqueue 1 (one script; enqueue_many one per 1000 jobs);
# claim 1 script per batch of up to the free threads, plus one BZPOPMIN when
# the queue is empty; finish 1 script, which also pushes the outcome to a
# waiter; enqueue_wait 1 BLPOP that receives the whole job, plus 1 script
# only when it times out. The heartbeat is one script per worker per third
# of a lease, whatever the number of jobs it holds; it also drops expired
# results from the indexes (their hashes expire by themselves) and tells the
# worker which of its jobs were cancelled. Progress costs one script per
# worker per PROGRESS_INTERVAL while some job sets it, whatever the number of
# calls; cancel_job is 1 script; retry_jobs and delete_jobs 1 ZRANGE and 1
# script per BULK_BATCH jobs.

def _lua(value: Any) -> str:
    """A Python constant as Lua source: ASCII text and numbers read the same in JSON, and a
    tuple or list becomes a table."""
    if isinstance(value, (tuple, list)):
        return "{" + ", ".join(map(_lua, value)) + "}"
    return json.dumps(value)


_NOT_A_NAME = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isalnum() or c == "_")})


def _lua_needed(lib: str, body: str) -> str:
    """``body`` after the definitions of ``lib`` that it names, and those that they name.

    Redis runs a script's whole text at every call, and each function it defines costs
    server time then, called or not: a script carries only what it uses. ``lib`` is Lua
    whose top-level lines each begin a definition ("local NAME = ..." or "local function
    NAME(...)"), or are a comment on the next one."""
    units: list[tuple[set[str], str]] = []
    notes = ""
    for line in lib.splitlines(keepends=True):
        if line.startswith("local "):
            defined = line[len("local "):].removeprefix("function ").split("=")[0].split("(")[0]
            units.append(({name.strip() for name in defined.split(",")}, notes + line))
            notes = ""
        elif line.startswith("--") or not line.strip():
            notes += line
        else:  # within the last definition
            units[-1] = (units[-1][0], units[-1][1] + notes + line)
            notes = ""
    def named(text: str) -> set[str]:  # the words of its code, not of its comments
        return set(" ".join(line.split("--")[0] for line in text.splitlines()).translate(_NOT_A_NAME).split())
    wanted = named(body)
    kept = [False] * len(units)
    grew = True
    while grew:
        grew = False
        for i, (names, text) in enumerate(units):
            if not kept[i] and names & wanted:
                kept[i] = grew = True
                wanted |= named(text)
    return "".join(text for (_, text), keep in zip(units, kept) if keep) + body


class _RedisScript:
    """A Lua script whose arguments are named where it is defined: ``args`` lists ARGV's
    names in order, the last one starred if it takes the rest as a table. The script reads
    them as locals (text, as Redis passes them); args() builds ARGV from the same names.
    ``body`` is preceded by what it uses of ``lib``: see _lua_needed."""

    def __init__(self, args: str, body: str, lib: str = "") -> None:
        names = args.split()
        self._rest = names.pop()[1:] if names and names[-1].startswith("*") else None
        self._names = names
        head = "".join(f"local {name} = ARGV[{i}]\n" for i, name in enumerate(names, 1))
        if self._rest:
            head += (f"local {self._rest} = {{}}\n"
                     f"for i = {len(names) + 1}, #ARGV do {self._rest}[#{self._rest} + 1] = ARGV[i] end\n")
        self.text = head + _lua_needed(lib, body)
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    def args(self, rest: Iterable[Any] = (), **named: Any) -> list[Any]:
        """ARGV for the named arguments, then ``rest`` for the starred one."""
        values = [named[name] for name in self._names]
        values.extend(rest)
        return values


# What finish_job reads of a job, in this order.
_FINISH_READS = ("task", "waiter", "attempt", "started", "due", "enqueued", "unique_key", "dependents")

# Shared by the scripts below: the rules' constants, as Python defines them; server
# time in ms, a type check that keeps a garbage key from failing a whole script, the
# counts, and the transitions that more than one script makes.
_REDIS_LIB = "".join(f"local {name} = {_lua(value)}\n" for name, value in (
    ("BUCKETS", _BUCKETS_MS), ("CANCELLED_BEFORE_IT_RAN", CANCELLED_BEFORE_IT_RAN),
    ("CANCELLED_WHILE_RUNNING", CANCELLED_WHILE_RUNNING), ("POISON_ERROR", POISON_ERROR),
    ("DEPENDENCY_ENDED", DEPENDENCY_ENDED),
    ("WORKER_ALIVE_LEASES", WORKER_ALIVE_LEASES), ("REQUEUE_CLEARS", REQUEUE_CLEARS),
    ("FINISH_READS", _FINISH_READS))) + """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- Lua's numbers are doubles, which redis.call turns into text with printf's %.14g, a
-- costly step of every script: whole numbers go as text made here, for far less.
local function int(n)
  return string.format('%d', n)
end

local function is_job(key)
  return redis.call('TYPE', key).ok == 'hash'
end

local function count(prefix, state, task, n)
  redis.call('HINCRBY', prefix .. 'counts', state .. ':' .. task, int(n))
end

-- Counts a finished job into the task's metrics, as Python's _observe does.
local function observe(prefix, task, failed, started, due, now)
  local metrics = prefix .. 'metrics'
  redis.call('HINCRBY', metrics, 'finished:' .. task, '1')
  if failed then redis.call('HINCRBY', metrics, 'failed:' .. task, '1') end
  if not (started and due) then return end  -- it never ran, or its record is incomplete
  for kind, ms in pairs({run = now - started, wait = started - due}) do
    local bucket = #BUCKETS
    for i, bound in ipairs(BUCKETS) do
      if ms <= bound then bucket = i - 1 break end
    end
    redis.call('HINCRBY', metrics, kind .. ':' .. task .. ':' .. int(bucket), '1')
    redis.call('HINCRBY', metrics, kind .. '_ms:' .. task, int(ms))
  end
end

local function done_member(key, id)
  local outcome = redis.call('HEXISTS', key, 'error') == 1 and 'failed' or 'done'
  return outcome .. ':' .. (redis.call('HGET', key, 'task') or '') .. ':' .. id
end

-- A job's place in its task's queue, a sorted set ordered by priority, then by number:
-- higher priorities first, the oldest first among equals. An exact integer below 2^53.
local function queue_score(priority, id)
  return int((100 - (tonumber(priority) or 0)) * 17592186044416 + (tonumber(id) or 0))
end

-- Makes a job claimable again, in its place by priority and number, from running or done.
local function requeue(prefix, id, task)
  local key = prefix .. 'job:' .. id
  redis.call('HSET', key, 'state', 'enqueued')
  redis.call('HDEL', key, 'started', 'worker')
  redis.call('ZADD', prefix .. 'enqueued', redis.call('ZSCORE', prefix .. 'jobs', id) or 0, id)
  redis.call('ZADD', prefix .. 'queue:' .. task, queue_score(redis.call('HGET', key, 'priority'), id), id)
  redis.call('ZADD', prefix .. 'ready:' .. task, 0, 1)
  count(prefix, 'enqueued', task, 1)
end

-- Lets go of a job's unique key, if it holds one: a job that is done or gone holds none.
local function release_key(prefix, task, id, unique_key)
  if unique_key and redis.call('HGET', prefix .. 'unique:' .. task, unique_key) == id then
    redis.call('HDEL', prefix .. 'unique:' .. task, unique_key)
  end
end

-- Records the outcome, the traceback (false: none) and the last progress (false:
-- unchanged), counts it, and hands the whole job to a waiting caller, if any:
-- the waiter flag flips once, here or in the withdraw script, never both.
-- A heartbeat removes the job once its result_ttl has passed; its key's own
-- expiry, a lease later (``keep`` ms), removes it if no worker is left to.
local function finish_job(prefix, id, outcome, field, value, now, keep, traceback, progress, read)
  local key = prefix .. 'job:' .. id
  -- ``read``: the job's FINISH_READS, if the caller has read them already.
  local task, waiter, attempt, started, due, enqueued, unique_key, dependents = unpack(
    read or redis.call('HMGET', key, unpack(FINISH_READS)))
  local kind, now_text = field == 'error' and 'failed' or 'done', int(now)
  local deadline = tonumber(waiter)
  if deadline == 0 then deadline = nil end
  task = task or ''
  local set = {'state', 'done', 'done', now_text, 'outcome', outcome, field, value}
  if traceback then set[#set + 1] = 'traceback'; set[#set + 1] = traceback end
  if progress then set[#set + 1] = 'progress'; set[#set + 1] = progress end
  if deadline then set[#set + 1] = 'waiter'; set[#set + 1] = '0' end  -- the flag flips here
  redis.call('HSET', key, unpack(set))
  if not traceback and attempt ~= '1' then  -- only a retried job can have one from an earlier attempt
    redis.call('HDEL', key, 'worker', 'traceback')
  else
    redis.call('HDEL', key, 'worker')
  end
  release_key(prefix, task, id, unique_key)
  observe(prefix, task, kind == 'failed', tonumber(started), tonumber(due or enqueued), now)
  redis.call('ZREM', prefix .. 'running', id)
  -- As done_member: a running job has no error field (requeue clears it).
  redis.call('ZADD', prefix .. 'done', now_text, kind .. ':' .. task .. ':' .. id)
  count(prefix, 'running', task, -1)
  count(prefix, kind, task, 1)
  -- A job with dependents (link flags it): those not settled yet are, by the script that
  -- takes its entry in ``ended`` (returns 2 then), and its record stays while one is deferred.
  local ended = 0
  if dependents then
    if redis.call('EXISTS', prefix .. 'unsettled:' .. id) == 1 then
      redis.call('RPUSH', prefix .. 'ended', id .. ' ' .. outcome)
      ended = 2
    end
  elseif keep > 0 then
    redis.call('PEXPIRE', key, int(keep))
  end
  if not deadline then return ended end
  -- Ten seconds past its deadline a waiter has withdrawn or died; the flag, now
  -- down, still settles a late withdrawal as a timeout.
  if now > deadline + 10000 then return ended end
  local handed = prefix .. 'outcome:' .. id
  redis.call('RPUSH', handed, cjson.encode(redis.call('HGETALL', key)))
  -- The waiter pops it at once; the expiry only bounds a waiter that died.
  redis.call('PEXPIRE', handed, math.max(deadline - now, 0) + 60000)
  return ended + 1
end

-- How a done job ended (a record from before outcomes were stored: by its error).
local function outcome_of(key)
  return redis.call('HGET', key, 'outcome') or (redis.call('HEXISTS', key, 'error') == 1 and 'failed'
                                                  or 'succeeded')
end

-- Makes a deferred job whose dependencies have all ended claimable, when its delay says.
local function release(prefix, id, key, task, now)
  redis.call('HSET', key, 'state', 'enqueued')
  redis.call('ZREM', prefix .. 'deferred', id)
  redis.call('ZADD', prefix .. 'enqueued', id, id)
  local due = tonumber(redis.call('HGET', key, 'due'))
  if due and due > now then
    redis.call('ZADD', prefix .. 'scheduled', due, id)
  else
    redis.call('ZADD', prefix .. 'queue:' .. task, queue_score(redis.call('HGET', key, 'priority'), id), id)
  end
  redis.call('ZADD', prefix .. 'ready:' .. task, 0, 1)
  count(prefix, 'deferred', task, -1)
  count(prefix, 'enqueued', task, 1)
end

-- Cancels a job that never ran (enqueued, delayed or deferred) with ``error``: out of every
-- index that holds it, then done as finish_job ends a running job. Returns finish_job's reply.
local function cancel_unstarted(prefix, id, state, task, error, now, keep)
  for _, index in ipairs({'enqueued', 'scheduled', 'queue:' .. task, 'deferred'}) do
    redis.call('ZREM', prefix .. index, id)
  end
  redis.call('DEL', prefix .. 'waiting:' .. id)
  count(prefix, state, task, -1)
  count(prefix, 'running', task, 1)
  return finish_job(prefix, id, 'cancelled', 'error', error, now, keep, false, false)
end

-- Settles deferred job ``id`` of this shard for its dependency ``parent``, which ended
-- with ``outcome``, once however often it is told (Queue._insert says the rule):
-- returns 2 if it was cancelled with dependents of its own to settle (see finish_job).
local function settle(prefix, id, parent, outcome, now, keep)
  local key = prefix .. 'job:' .. id
  if redis.call('SREM', prefix .. 'waiting:' .. id, parent) == 0 or not is_job(key)
      or redis.call('HGET', key, 'state') ~= 'deferred' then
    return 0
  end
  local task = redis.call('HGET', key, 'task') or ''
  if outcome ~= 'succeeded' and redis.call('HEXISTS', key, 'allow_failure') == 0 then
    local error = string.format(DEPENDENCY_ENDED, parent, outcome)
    local ended = cancel_unstarted(prefix, id, 'deferred', task, error, now, keep)
    return ended >= 2 and 2 or 0
  end
  if redis.call('SCARD', prefix .. 'waiting:' .. id) == 0 then release(prefix, id, key, task, now) end
  return 0
end
"""

# Stores jobs of one task, numbered in one step so that no job is ever half-written.
# ``jobs`` is a flat list of params and unique key ('' for none). A job whose unique
# key an unfinished job of the task holds isn't stored: its index, that job's id and
# fields are returned instead. A job's id names its shard: the shard's own count
# times the number of shards, plus the shard. Returns now, the first id (the next
# ones follow ``shards`` apart), the due time (or false) and those.
#
# ``deps``, if given, are the jobs' dependencies: ``ids`` their ids, ``near`` those of this
# shard (if one is no job, nothing is stored: returns the missing id 5th), ``allow`` true
# for allow_failure, ``keep`` as finish_job's. The jobs are
# stored deferred, linked to each dependency here (settled at once by those done: their
# fields are returned 6th) and marked in ``linking`` if some are on other shards, for
# Python to link there.
_REDIS_ENQUEUE_LIB = _REDIS_LIB + """
local function link(prefix, parent, id, settles)
  local key = prefix .. 'job:' .. parent
  if not is_job(key) then
    settles[#settles + 1] = {id, parent, 'deleted'}
    return
  end
  redis.call('SADD', prefix .. 'dependents:' .. parent, id)
  redis.call('HSET', key, 'dependents', '1')
  if redis.call('HGET', key, 'state') == 'done' then
    redis.call('PERSIST', key)  -- a heartbeat expires it, once no dependent needs it
    settles[#settles + 1] = {id, parent, outcome_of(key)}
  else
    redis.call('SADD', prefix .. 'unsettled:' .. parent, id)
  end
end

local function enqueue_jobs(prefix, shards, shard, task, stack, waiter, delay, limit, priority, jobs, deps)
  if deps then
    for _, parent in ipairs(deps.near) do
      if not is_job(prefix .. 'job:' .. parent) then return 0, 0, false, {}, parent, {} end
    end
  end
  local now = now_ms()
  local n, now_text = #jobs / 2, int(now)
  local last = redis.call('INCRBY', prefix .. 'seq', int(n))
  local unique = prefix .. 'unique:' .. task
  local held, stored, queued, deferred = {}, 0, {}, {}
  -- The fields that every job of the batch has, stored with the rest in one call each.
  local common = {'state', deps and 'deferred' or 'enqueued', 'enqueued', now_text, 'stack', stack,
                  'delivery', '0', 'attempt', '1', 'task', task}
  local function add(name, value) common[#common + 1] = name; common[#common + 1] = value end
  if waiter ~= '' then add('waiter', now + tonumber(waiter)) end
  if limit ~= '' then add('time_limit', limit) end
  if priority ~= 0 then add('priority', priority) end
  if delay > 0 then add('due', now + delay) end
  if deps then
    add('depends_on', cjson.encode(deps.ids))
    if deps.allow then add('allow_failure', '1') end
  end
  for i = 1, n do
    local unique_key = jobs[2 * i]
    local holder = unique_key ~= '' and redis.call('HGET', unique, unique_key)
    local state = holder and redis.call('HGET', prefix .. 'job:' .. holder, 'state')
    if state and state ~= 'done' then
      held[#held + 1] = {i, holder, redis.call('HGETALL', prefix .. 'job:' .. holder)}
    else
      local id = int((last - n + i) * shards + shard)
      local key = prefix .. 'job:' .. id
      if unique_key ~= '' then
        redis.call('HSET', key, 'params', jobs[2 * i - 1], 'unique_key', unique_key, unpack(common))
        redis.call('HSET', unique, unique_key, id)
      else
        redis.call('HSET', key, 'params', jobs[2 * i - 1], unpack(common))
      end
      redis.call('ZADD', prefix .. 'jobs', id, id)  -- scored by its number: the id itself
      redis.call('ZADD', prefix .. 'task:' .. task, id, id)
      if deps then
        redis.call('ZADD', prefix .. 'deferred', id, id)
        for from = 1, #deps.ids, 1000 do  -- unpack takes a few thousand values at most
          local to = math.min(from + 999, #deps.ids)
          redis.call('SADD', prefix .. 'waiting:' .. id, unpack(deps.ids, from, to))
        end
        if #deps.near < #deps.ids then redis.call('ZADD', prefix .. 'linking', now, id) end
        deferred[#deferred + 1] = {i, id}
      else
        redis.call('ZADD', prefix .. 'enqueued', id, id)
        if delay > 0 then
          redis.call('ZADD', prefix .. 'scheduled', now + delay, id)
        else
          queued[#queued + 1] = queue_score(priority, id)
          queued[#queued + 1] = id
        end
      end
      stored = stored + 1
    end
  end
  if #queued > 0 then redis.call('ZADD', prefix .. 'queue:' .. task, unpack(queued)) end
  local settled = {}
  if deps then
    count(prefix, 'deferred', task, stored)
    local settles = {}
    for _, job in ipairs(deferred) do
      for _, parent in ipairs(deps.near) do link(prefix, parent, job[2], settles) end
    end
    for _, s in ipairs(settles) do settle(prefix, s[1], s[2], s[3], now, deps.keep) end
    for _, job in ipairs(deferred) do
      local key = prefix .. 'job:' .. job[2]
      if redis.call('HGET', key, 'state') ~= 'deferred' then
        settled[#settled + 1] = {job[1], redis.call('HGETALL', key)}
      end
    end
  else
    count(prefix, 'enqueued', task, stored)
  end
  -- Also for delayed jobs: it wakes a worker to learn when the first is due.
  redis.call('ZADD', prefix .. 'ready:' .. task, '0', '1')
  return now, int((last - n) * shards + shard + shards), delay > 0 and now + delay or false, held, false,
         settled
end
"""

# KEYS: seq (for the slot). ``waiter``: its timeout in ms ('' for none); ``delay`` in ms;
# ``limit``: the time limit in s ('' for the task's); ``deps``: enqueue_jobs' in JSON ('' for
# none); ``jobs``: params and unique key of each.
_REDIS_ENQUEUE = _RedisScript("prefix shards shard task stack waiter delay limit priority deps *jobs",
                              """
return {enqueue_jobs(prefix, tonumber(shards), tonumber(shard), task, stack, waiter, tonumber(delay), limit,
                     tonumber(priority), jobs, deps ~= '' and cjson.decode(deps) or nil)}
""", _REDIS_ENQUEUE_LIB)

# Links dependents to their dependencies on this shard, as enqueue_jobs does on its own:
# ``links`` are pairs of dependency and dependent ids. Returns what settles the dependents
# at once, as (dependent, dependency, outcome): those done, and those gone ("deleted").
# KEYS: seq (for the slot).
_REDIS_LINK = _RedisScript("prefix *links", """
local settles = {}
for i = 1, #links, 2 do link(prefix, links[i], links[i + 1], settles) end
return settles
""", _REDIS_ENQUEUE_LIB)

# Settles deferred jobs of this shard, each for a dependency that ended (see settle), and
# takes the jobs in ``linked`` out of ``linking``: their links are all made. Returns 2 if
# some job it cancelled has dependents to settle in turn. KEYS: deferred (for the slot).
# ``settles``: the triples of dependent, dependency and outcome.
_REDIS_SETTLE = _RedisScript("prefix keep linked *settles", """
local now, ended = now_ms(), 0
for i = 1, #settles, 3 do
  ended = math.max(ended, settle(prefix, settles[i], settles[i + 1], settles[i + 2], now, tonumber(keep)))
end
for _, id in ipairs(cjson.decode(linked)) do redis.call('ZREM', prefix .. 'linking', id) end
return ended
""", _REDIS_LIB)

# Takes the entries of ``ended`` (jobs of this shard that ended with dependents to settle)
# in turn, and settles up to 500 of their dependents of this shard; an entry goes once none
# is left. Returns false once ``ended`` is empty, else the job, its outcome and the ones of
# its dependents on other shards met, for Python to settle there and to pass back in
# ``settled`` with the next call, which takes them out of ``unsettled`` first (or no such
# job: 500 were settled). KEYS: ended.
_REDIS_SETTLE_ENDED = _RedisScript("prefix shards shard keep parent *settled", """
for from = 1, #settled, 1000 do
  redis.call('SREM', prefix .. 'unsettled:' .. parent, unpack(settled, from, math.min(from + 999, #settled)))
end
local now, budget = now_ms(), 500
while budget > 0 do
  local entry = redis.call('LINDEX', KEYS[1], 0)
  if not entry then return false end
  local parent, outcome = string.match(entry, '^(%S+) (%S+)$')
  local unsettled = prefix .. 'unsettled:' .. (parent or '')
  local some, far = parent and redis.call('SRANDMEMBER', unsettled, budget) or {}, {}
  for _, id in ipairs(some) do
    if (tonumber(id) or 0) % tonumber(shards) == tonumber(shard) then
      settle(prefix, id, parent, outcome, now, tonumber(keep))
      redis.call('SREM', unsettled, id)
    else
      far[#far + 1] = id
    end
  end
  if #far > 0 then return {parent, outcome, far} end
  if redis.call('EXISTS', unsettled) == 0 then redis.call('LPOP', KEYS[1]) end
  budget = budget - math.max(#some, 1)
end
return {'', '', {}}
""", _REDIS_LIB)


# Records a schedule and, if the tick is later than the last one fired, enqueues its
# job and records the tick: the one decision every worker racing for the tick meets.
# Returns the job's id (false if the tick was fired already) and the last tick before.
# KEYS: periodic. ``tick`` and ``next_tick`` in ms (tick '' to only record); ``unique_key''
# '' for none.
_REDIS_FIRE = _RedisScript("prefix name tick next_tick task expression stack priority params unique_key "
                           "shards shard", """
local read, record = pcall(cjson.decode, redis.call('HGET', KEYS[1], name) or '{}')
if not read or type(record) ~= 'table' then record = {} end  -- junk: a new record replaces it
local last = tonumber(record.last)
record.name, record.task, record.schedule, record.next = name, task, expression, tonumber(next_tick)
local fired = false
if tick ~= '' and (last or 0) < tonumber(tick) then
  local _, first, _, held = enqueue_jobs(prefix, tonumber(shards), tonumber(shard), task, stack, '', 0, '',
                                         tonumber(priority), {params, unique_key}, nil)
  fired = held[1] and held[1][2] or first
  record.last, record.last_job = tonumber(tick), fired
end
redis.call('HSET', KEYS[1], name, cjson.encode(record))
return {fired, last or false}
""", _REDIS_ENQUEUE_LIB)

# Moves due jobs to their queues, then pops ids and records the claim in the
# same step, so no crash can lose a popped job: it is in the running set with
# a lease deadline, or still queued. Returns the claimed jobs and how long
# until the next scheduled job is due (-1 for none), the server's time and the tasks
# whose keys are of the wrong type. Each claimed job is its id, task and new delivery,
# then _CLAIMED_FIELDS.
# KEYS: running. ``lease`` and ``keep`` (see finish_job) in ms.
_CLAIMED_FIELDS = ("params", "enqueued", "attempt", "due", "stack", "time_limit", "priority", "unique_key",
                   "depends_on")
_REDIS_CLAIM = _RedisScript("prefix limit worker lease keep *tasks", """
limit = tonumber(limit)
local now = now_ms()
local now_text = int(now)
local due = redis.call('ZRANGEBYSCORE', prefix .. 'scheduled', '-inf', now_text, 'LIMIT', '0', '1000')
-- A task whose queue or ready key is of the wrong type (garbage written there) holds up
-- no other: its commands are run by pcall, and it is passed over and reported.
local broken = {}
local function failed(reply, task)
  if type(reply) == 'table' and reply.err then broken[task] = true end
  return broken[task]
end
for _, id in ipairs(due) do
  local key = prefix .. 'job:' .. id
  if not is_job(key) then
    redis.call('ZREM', prefix .. 'scheduled', id)
  else
    local task, priority = unpack(redis.call('HMGET', key, 'task', 'priority'))
    task = task or ''
    if not failed(redis.pcall('ZADD', prefix .. 'queue:' .. task, queue_score(priority, id), id), task) then
      redis.call('ZREM', prefix .. 'scheduled', id)  -- else it waits there
      failed(redis.pcall('ZADD', prefix .. 'ready:' .. task, '0', '1'), task)
    end
  end
end
-- The best ids of all these tasks: the highest priority first, then the oldest. A
-- task's queue is in that order; the heads of several are merged by their scores
-- (read only then: Redis writes each score as text with printf).
local best, merge, last = {}, #tasks > 1, int(limit - 1)
for _, task in ipairs(tasks) do
  local queue = prefix .. 'queue:' .. task
  if merge then
    local top = redis.pcall('ZRANGE', queue, '0', last, 'WITHSCORES')
    if not failed(top, task) then
      for j = 1, #top, 2 do best[#best + 1] = {tonumber(top[j + 1]), task, top[j]} end
    end
  else
    local top = redis.pcall('ZRANGE', queue, '0', last)
    if not failed(top, task) then
      for _, id in ipairs(top) do best[#best + 1] = {0, task, id} end
    end
  end
end
if merge then table.sort(best, function(a, b) return a[1] < b[1] end) end
local taken = {}
for j = 1, math.min(limit, #best) do
  taken[best[j][2]] = taken[best[j][2]] or {}
  table.insert(taken[best[j][2]], best[j][3])
end
for task, ids in pairs(taken) do redis.call('ZREM', prefix .. 'queue:' .. task, unpack(ids)) end
local claimed, started = {}, {}
for j = 1, math.min(limit, #best) do
  local task, id = best[j][2], best[j][3]
  local key = prefix .. 'job:' .. id
  local kind = redis.call('TYPE', key).ok
  -- Counted off only once: a cancelled job's id stays in its queue, counted already.
  if kind ~= 'hash' and redis.call('ZREM', prefix .. 'enqueued', id) == 1 then
    count(prefix, 'enqueued', task, -1)
  end
  if kind == 'none' then  -- its hash is gone: nothing left to run or to show
    redis.call('ZREM', prefix .. 'jobs', id)
    redis.call('ZREM', prefix .. 'task:' .. task, id)
  elseif kind ~= 'hash' then
    -- Garbage where a job should be: keep it as a job that failed, saying so.
    redis.call('DEL', key)
    redis.call('HSET', key, 'task', task, 'params', '{}', 'state', 'running', 'enqueued', now)
    count(prefix, 'running', task, 1)
    finish_job(prefix, id, 'failed', 'error', 'the stored job was a Redis ' .. kind .. ', not a hash', now,
               tonumber(keep), false, false)
  else
    -- Only what the worker can't know: it set task, state, started and worker itself.
    local f = redis.call('HMGET', key, 'state', 'delivery', CLAIMED_FIELDS)
    local state, delivery, due = f[1], f[2], f[2 + DUE]
    if state and state ~= 'deferred' and state ~= 'enqueued' and state ~= 'running' and state ~= 'done' then
      -- A state no job has: failed now, as any record that can't be read.
      if redis.call('ZREM', prefix .. 'enqueued', id) == 1 then count(prefix, 'enqueued', task, -1) end
      redis.call('HSET', key, 'state', 'running')
      count(prefix, 'running', task, 1)
      finish_job(prefix, id, 'failed', 'error', 'the stored job has a state that is no job state: ' .. state,
                 now, tonumber(keep), false, false)
    -- Else it was cancelled while it waited, or it is a stale id of a job scheduled again.
    elseif (state == 'enqueued' or not state) and (tonumber(due) or 0) <= now then
      delivery = (tonumber(delivery) or 0) + 1
      redis.call('HSET', key, 'state', 'running', 'started', now_text, 'worker', worker,
                 'delivery', int(delivery))
      redis.call('ZREM', prefix .. 'enqueued', id)
      redis.call('ZADD', KEYS[1], int(now + tonumber(lease)), id)
      local job = {id, task, delivery}
      for i = 3, #f do job[i + 1] = f[i] end
      claimed[#claimed + 1] = job
      started[task] = (started[task] or 0) + 1
    end
  end
end
for task, n in pairs(started) do
  count(prefix, 'enqueued', task, -n)
  count(prefix, 'running', task, n)
end
for _, task in ipairs(tasks) do
  if broken[task] then
  elseif redis.call('ZCARD', prefix .. 'queue:' .. task) > 0 then
    failed(redis.pcall('ZADD', prefix .. 'ready:' .. task, 0, 1), task)
  else
    redis.call('DEL', prefix .. 'ready:' .. task)
  end
end
local unclaimable = {}
for task in pairs(broken) do unclaimable[#unclaimable + 1] = task end
local next_due = redis.call('ZRANGE', prefix .. 'scheduled', 0, 0, 'WITHSCORES')[2]
return {claimed, next_due and math.max(tonumber(next_due) - now, 0) or -1, now, unclaimable}
""".replace("CLAIMED_FIELDS", ", ".join(map(_lua, _CLAIMED_FIELDS)))
   .replace("DUE", str(_CLAIMED_FIELDS.index("due") + 1)), _REDIS_LIB)

# The guard of finish and retry: only the delivery that holds the job may end it. It reads
# what finish_job needs along with it, in one call (the task third).
_REDIS_HELD = """
local held = redis.call('HMGET', KEYS[1], 'state', 'delivery', unpack(FINISH_READS))
if held[1] ~= 'running' or held[2] ~= delivery then return -1 end
"""

# KEYS: job:ID. ``field``: 'result' or 'error', ``value`` its text; ``keep`` in ms (see
# finish_job); ``traceback`` '' for none, ``progress`` '' for unchanged.
_REDIS_FINISH = _RedisScript("prefix id delivery outcome field value keep traceback progress",
                             _REDIS_HELD + """
return finish_job(prefix, id, outcome, field, value, now_ms(), tonumber(keep), traceback ~= '' and traceback,
                  progress ~= '' and progress, {unpack(held, 3)})
""", _REDIS_LIB)

# Puts a held job back, due in ``delay`` ms; returns 0, changing nothing, if it was
# cancelled while it ran (the worker finishes it as cancelled). KEYS: job:ID.
# ``traceback``: the failed attempt's, '' for none.
_REDIS_RETRY = _RedisScript("prefix id delivery delay traceback", _REDIS_HELD + """
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then return 0 end
local due = now_ms() + tonumber(delay)
local task = held[3] or ''
redis.call('HSET', KEYS[1], 'state', 'enqueued', 'due', due)
redis.call('HDEL', KEYS[1], 'started', 'worker')
if traceback ~= '' then redis.call('HSET', KEYS[1], 'traceback', traceback)
else redis.call('HDEL', KEYS[1], 'traceback') end
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('ZREM', prefix .. 'running', id)
redis.call('ZADD', prefix .. 'enqueued', redis.call('ZSCORE', prefix .. 'jobs', id) or 0, id)
redis.call('ZADD', prefix .. 'scheduled', due, id)
redis.call('ZADD', prefix .. 'ready:' .. task, 0, 1)  -- an idle worker learns when it is due
count(prefix, 'running', task, -1)
count(prefix, 'enqueued', task, 1)
return 1
""", _REDIS_LIB)

# Withdraws a waiter that timed out, unless the outcome was handed first: then
# returns it. KEYS: job:ID.
_REDIS_WITHDRAW = _RedisScript("prefix id", """
local outcome = prefix .. 'outcome:' .. id
if is_job(KEYS[1]) and (tonumber(redis.call('HGET', KEYS[1], 'waiter')) or 0) ~= 0 then
  redis.call('HSET', KEYS[1], 'waiter', 0)
  return false
end
local handed = redis.call('LPOP', outcome)
redis.call('DEL', outcome)
return handed
""", _REDIS_LIB)

# Renews the leases this worker holds and records it alive; requeues jobs whose
# lease ran out, or fails them once delivered max_deliveries times or cancelled;
# drops expired results from the indexes, and workers not seen for three
# leases. Returns the ids of the held jobs that were cancelled, the length of ``ended``,
# the results past their ttl kept for their dependents, and up to 100 jobs whose
# links to dependencies on other shards were left unmade a lease ago (see _link_far).
# KEYS: running. ``lease`` and ``ttl`` (the result's; 0: kept) in ms; ``tasks``: the
# worker's, as JSON; ``held``: the id and delivery of each job it holds.
_REDIS_HEARTBEAT = _RedisScript("prefix lease max_deliveries ttl worker tasks *held", """
lease, ttl = tonumber(lease), tonumber(ttl)
local now = now_ms()
local cancelled = {}
for i = 1, #held, 2 do
  local key = prefix .. 'job:' .. held[i]
  if is_job(key) then
    local delivery, cancel = unpack(redis.call('HMGET', key, 'delivery', 'cancel'))
    if delivery == held[i + 1] then
      redis.call('ZADD', KEYS[1], 'XX', now + lease, held[i])
      if cancel then cancelled[#cancelled + 1] = held[i] end
    end
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[1], id)
  local key = prefix .. 'job:' .. id
  if is_job(key) and redis.call('HGET', key, 'state') == 'running' then
    local task = redis.call('HGET', key, 'task') or ''
    -- Lost leases are counted apart from deliveries: retries deliver a job again too.
    local lost = redis.call('HINCRBY', key, 'lost', 1)
    local error, outcome = false, 'failed'
    if redis.call('HEXISTS', key, 'cancel') == 1 then
      error, outcome = CANCELLED_WHILE_RUNNING, 'cancelled'
    elseif lost >= tonumber(max_deliveries) then
      error = string.format(POISON_ERROR, tonumber(redis.call('HGET', key, 'delivery')) or 0, lost)
    end
    if error then
      redis.call('ZADD', KEYS[1], now, id)  -- finish_job takes it out again
      finish_job(prefix, id, outcome, 'error', error, now, ttl > 0 and ttl + lease or 0, false, false)
    else
      count(prefix, 'running', task, -1)
      requeue(prefix, id, task)
    end
  end
end
-- Results past their ttl go, 1000 a beat at most, but those with dependents (Python keeps
-- in ``dependents`` the ones still deferred): passed over, and returned for Python to look at.
local kept = {}
if ttl > 0 then
  local expired = redis.call('ZRANGEBYSCORE', prefix .. 'done', '-inf', now - ttl, 'LIMIT', 0, 1000)
  for _, member in ipairs(expired) do
    local outcome, task, id = string.match(member, '^(%a+):(.*):([^:]*)$')
    if id and redis.call('EXISTS', prefix .. 'dependents:' .. id) == 1 then
      kept[#kept + 1] = id
    else
      redis.call('ZREM', prefix .. 'done', member)
      if id then  -- not a member this library wrote: dropped above, nothing more to undo
        redis.call('ZREM', prefix .. 'jobs', id)
        redis.call('ZREM', prefix .. 'task:' .. task, id)
        redis.call('DEL', prefix .. 'job:' .. id)
        count(prefix, outcome, task, -1)
      end
    end
  end
end
redis.call('HSET', prefix .. 'workers', worker, now .. ' ' .. tasks)
local workers = redis.call('HGETALL', prefix .. 'workers')
for i = 1, #workers, 2 do
  if (tonumber(string.match(workers[i + 1], '^%d+')) or 0) < now - WORKER_ALIVE_LEASES * lease then
    redis.call('HDEL', prefix .. 'workers', workers[i])
  end
end
local linking = redis.call('ZRANGEBYSCORE', prefix .. 'linking', '-inf', now - lease, 'LIMIT', 0, 100)
return {cancelled, redis.call('LLEN', prefix .. 'ended'), kept, linking}
""", _REDIS_LIB)

# Stores the progress of running jobs, each only while that delivery holds it.
# KEYS: running (for the slot). ``progress``: the id, delivery and progress of each job.
_REDIS_PROGRESS = _RedisScript("prefix *progress", """
for i = 1, #progress, 3 do
  local key = prefix .. 'job:' .. progress[i]
  if redis.call('TYPE', key).ok == 'hash' then
    local held = redis.call('HMGET', key, 'state', 'delivery')
    if held[1] == 'running' and held[2] == progress[i + 1] then
      redis.call('HSET', key, 'progress', progress[i + 2])
    end
  end
end
""")

# Cancels a job: an enqueued or delayed one is done at once (the claim script drops
# its id from the queue); a running one is marked, for its worker's heartbeat.
# Returns the state it was in, or false if there is no job. KEYS: job:ID. ``keep`` in
# ms (see finish_job).
_REDIS_CANCEL = _RedisScript("prefix id keep", """
if not is_job(KEYS[1]) then return false end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'enqueued' or state == 'deferred' then
  cancel_unstarted(prefix, id, state, redis.call('HGET', KEYS[1], 'task') or '', CANCELLED_BEFORE_IT_RAN,
                   now_ms(), tonumber(keep))
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1)
  local worker = redis.call('HGET', KEYS[1], 'worker')
  if worker then  -- its worker's heartbeat waits on this list: it interrupts the job at once
    redis.call('RPUSH', prefix .. 'cancels:' .. worker, id)
    redis.call('PEXPIRE', prefix .. 'cancels:' .. worker, 60000)
  end
end
return state
""", _REDIS_LIB)

# What retry_job, delete_job and their bulk twins do to one job: run a done job
# again from its first attempt, or remove a job from every structure that names it.
_REDIS_CHANGE_LIB = _REDIS_LIB + """
local function retry_done(prefix, id)
  local key = prefix .. 'job:' .. id
  local task = redis.call('HGET', key, 'task') or ''
  local member = done_member(key, id)
  redis.call('ZREM', prefix .. 'done', member)
  count(prefix, string.match(member, '^%a+'), task, -1)
  redis.call('HDEL', key, unpack(REQUEUE_CLEARS))
  -- Due now: its queue wait counts from here, not from when it was first enqueued.
  redis.call('HSET', key, 'attempt', 1, 'due', now_ms())
  redis.call('PERSIST', key)
  requeue(prefix, id, task)
  -- It holds its unique key again, unless an unfinished job took it meanwhile.
  local unique_key = redis.call('HGET', key, 'unique_key')
  if unique_key then redis.call('HSETNX', prefix .. 'unique:' .. task, unique_key, id) end
end

local function delete_job(prefix, id)
  local key = prefix .. 'job:' .. id
  if is_job(key) then
    local task = redis.call('HGET', key, 'task') or ''
    local state = redis.call('HGET', key, 'state')
    if state == 'done' then
      local member = done_member(key, id)
      redis.call('ZREM', prefix .. 'done', member)
      count(prefix, string.match(member, '^%a+'), task, -1)
    elseif state == 'deferred' or state == 'enqueued' or state == 'running' then
      count(prefix, state, task, -1)
    end
    -- Its dependents not settled yet are settled as by a job that ended, "deleted".
    if state ~= 'done' and redis.call('EXISTS', prefix .. 'unsettled:' .. id) == 1 then
      redis.call('RPUSH', prefix .. 'ended', id .. ' deleted')
    end
    release_key(prefix, task, id, redis.call('HGET', key, 'unique_key'))
    redis.call('ZREM', prefix .. 'queue:' .. task, id)
    redis.call('ZREM', prefix .. 'task:' .. task, id)
  end
  for _, of in ipairs({'job:', 'outcome:', 'waiting:', 'dependents:'}) do
    redis.call('DEL', prefix .. of .. id)
  end
  for _, index in ipairs({'jobs', 'enqueued', 'running', 'scheduled', 'deferred', 'linking'}) do
    redis.call('ZREM', prefix .. index, id)
  end
end
"""

# KEYS: job:ID. Returns 0 for no such job, -1 for a job that isn't done.
_REDIS_REQUEUE = _RedisScript("prefix id", """
if not is_job(KEYS[1]) then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'done' then return -1 end
retry_done(prefix, id)
return 1
""", _REDIS_CHANGE_LIB)

# KEYS: job:ID. Returns 0 for no such job.
_REDIS_DELETE = _RedisScript("prefix id", """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
delete_job(prefix, id)
return 1
""", _REDIS_CHANGE_LIB)

# Retries or deletes those of the given jobs that are (still) in the state, of
# the task; returns how many. KEYS: jobs (for the slot). ``action``: 'retry' or 'delete';
# ``state``: enqueued, done or failed; ``task``: '' for any.
_REDIS_BULK = _RedisScript("prefix action state task *ids", """
local changed = 0
for _, id in ipairs(ids) do
  local key = prefix .. 'job:' .. id
  if is_job(key) then
    local f = redis.call('HMGET', key, 'state', 'task', 'error')
    local in_state = f[1] == state or (state == 'failed' and f[1] == 'done' and f[3])
    if in_state and (task == '' or f[2] == task) then
      if action == 'retry' then retry_done(prefix, id) else delete_job(prefix, id) end
      changed = changed + 1
    end
  end
end
return changed
""", _REDIS_CHANGE_LIB)


# The number of shards a queue's ids are numbered for, recorded by the first enqueue or
# worker: unless ``record`` is '0', records ``shards`` if there is none. KEYS: shards.
_REDIS_SHARDS = _RedisScript("shards record", """
local stored = redis.call('GET', KEYS[1])
if not stored and record == '1' then
  stored = shards
  redis.call('SET', KEYS[1], stored)
end
return stored
""")


class RedisQueue(Queue):
    """A queue stored in Redis (or Valkey, or a Redis Cluster), for many workers; with
    ``shards=N``, spread over N hash tags, so over N masters of a cluster."""

    def __init__(self, url: str | None = None, *, client: Any = None,
                 key_prefix: str = "monsterqueue", shards: int = 1,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise ValueError(f"shards must be a whole number of at least 1, not {shards!r}")
        redis = _require("redis", "redis")
        self._py = _redis_py(redis)
        self._owns_client = client is None  # close() leaves a client passed in to its owner
        # The a* methods make asyncio clients like the one made from the URL; with a client
        # passed in, they run the sync calls on the loop's executor.
        self._url = None if client is not None else url or "redis://localhost:6379/0"
        self._connect_timeout = connect_timeout
        if client is None:
            # No automatic retries: a retried enqueue whose reply was lost would store it twice.
            # No pool limit (redis-py 8 sets 100): each enqueue_wait caller holds a connection
            # in BLPOP, and a full pool would fail the workers that would answer them.
            client = redis.Redis.from_url(url or "redis://localhost:6379/0", decode_responses=True,
                                          encoding_errors="surrogateescape",
                                          socket_connect_timeout=connect_timeout, max_connections=2**31,
                                          retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        self.client = client
        self._server_errors = (redis.ConnectionError, redis.TimeoutError, _NoAnswer)
        pool = getattr(client, "connection_pool", None)  # a cluster client has one per node
        kwargs = getattr(pool, "connection_kwargs", {})
        self._address = kwargs.get("path") or (
            f"{kwargs['host']}:{kwargs.get('port', 6379)}" if "host" in kwargs else repr(pool or client))
        self._prefix = "{" + key_prefix + "}:"
        # The first shard is the queue's own hash tag, so that shards=1 is the layout of old.
        self._prefixes = [self._prefix, *("{" + tag + "}:" for tag in _shard_tags(key_prefix, shards)[1:])]
        self._next_shard = itertools.count(secrets.randbelow(shards))  # where the next batch goes
        self._turn = 0  # the shard the worker claims from next
        # Per shard, the tasks whose keys the last claim found of the wrong type: idle workers
        # don't wait on them, as a blocking pop on one fails for every key.
        self._unclaimable: dict[str, set[str]] = {prefix: set() for prefix in self._prefixes}
        # Set by a claim that took fewer jobs than it could from the only shard: the tasks it
        # claimed for, and time.monotonic() when its soonest delayed job is due (inf: none).
        self._drained: tuple[list[str], float] | None = None
        self._shards_checked = False
        self._cluster = isinstance(client, redis.RedisCluster)
        self._connections = _Connections(client, self._py)
        self._command = self._connections.command
        self._script = self._connections.script

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _prefix_of(self, job_id: str) -> str:
        """The key prefix of the shard a job's id names: the id modulo the number of shards."""
        if len(self._prefixes) == 1 or not (job_id.isascii() and job_id.isdigit()):
            return self._prefix
        return self._prefixes[int(job_id) % len(self._prefixes)]

    def _job_key(self, job_id: str) -> str:
        return self._prefix_of(job_id) + "job:" + job_id

    def _by_shard(self, jobs: Iterable[Job]) -> dict[str, list[Job]]:
        """The jobs of each shard, by its key prefix: every shard, with jobs or without."""
        grouped: dict[str, list[Job]] = {prefix: [] for prefix in self._prefixes}
        for job in jobs:
            grouped[self._prefix_of(job.id)].append(job)
        return grouped

    def _shard_of_key(self, unique_key: str) -> int:
        # Every job of a unique key lands on one shard, whose script alone decides who holds it.
        return binascii.crc32(unique_key.encode()) % len(self._prefixes)

    def _check_shards(self, record: bool = True) -> None:
        """Refuse, once per queue object, to serve a queue whose ids are numbered for another
        number of shards (they name their shard by it). The first enqueue or worker records
        the number; a read (stats, listing, the CLI) only compares."""
        if self._shards_checked:
            return
        shards = len(self._prefixes)
        stored = self._script(_REDIS_SHARDS, [self._key("shards")],
                              _REDIS_SHARDS.args(shards=shards, record=int(record)))
        if stored is not None and int(stored) != shards:
            raise ValueError(f"this queue's jobs are numbered for shards={int(stored)}, not {shards}: "
                             f"its shards can't change (start a queue under a new key_prefix instead)")
        self._shards_checked = stored is not None

    def _ttl_ms(self) -> int:
        return int(self.result_ttl * 1000) if self.result_ttl else 0

    def _keep_ms(self) -> int:
        return int((self.result_ttl + self.lease_timeout) * 1000) if self.result_ttl else 0

    def _insert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        self._check_shards()
        if batch.depends_on:
            self._check_far_dependencies(batch)
        calls, replies = self._enqueue_calls(batch, jobs), []
        try:
            for keys, args, _ in calls:
                replies.append(self._script(_REDIS_ENQUEUE, keys, args))
        except Exception as exc:
            if replies:
                raise self._cut_short(exc, calls, replies) from exc
            raise
        stored = self._placed(len(jobs), calls, replies)
        return self._linked(batch, calls, replies, stored) if batch.depends_on and self._links_apart(batch) \
            else stored

    async def _ainsert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                       ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        if self._url is None:
            return await super()._ainsert(batch, jobs)
        if not self._shards_checked:
            import asyncio
            await asyncio.get_running_loop().run_in_executor(None, self._check_shards)
        if self._links_apart(batch):  # the sync client's work
            return await super()._ainsert(batch, jobs)
        calls, replies = self._enqueue_calls(batch, jobs), []
        try:
            for keys, args, _ in calls:
                replies.append(await self._aconnections().ascript(_REDIS_ENQUEUE, keys, args))
        except Exception as exc:
            if replies:
                raise self._cut_short(exc, calls, replies) from exc
            raise
        return self._placed(len(jobs), calls, replies)

    def _near(self, prefix: str, batch: _Batch) -> list[str]:
        """The dependencies the enqueue script checks and links itself, on shard ``prefix``: those
        of that shard, unless there are more than a script should take (see _links_apart)."""
        if len(batch.depends_on) > 1000:
            return []
        return [job_id for job_id in batch.depends_on if self._prefix_of(job_id) == prefix]

    def _links_apart(self, batch: _Batch) -> bool:
        """Whether some dependencies are linked by scripts of their own after the store, with the
        jobs marked in ``linking`` meanwhile: those on other shards, and all of more than 1000
        (a fan-in's links in one script would hold Redis for tens of ms)."""
        return bool(batch.depends_on) and (len(self._prefixes) > 1 or len(batch.depends_on) > 1000)

    def _check_far_dependencies(self, batch: _Batch) -> None:
        # Those the enqueue script links it checks itself, as it stores the jobs.
        if not self._links_apart(batch):
            return
        pipe = self.client.pipeline(transaction=False)
        for job_id in batch.depends_on:
            pipe.exists(self._job_key(job_id))
        for job_id, found in zip(batch.depends_on, pipe.execute()):
            if not found:
                raise NoSuchJobError(f"no job {job_id} to depend on")

    def _linked(self, batch: _Batch, calls: list[tuple[list[str], list[Any], list[int]]], replies: list[Any],
                stored: list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        """Link newly stored dependents to the dependencies the enqueue script left to link (see
        _links_apart); return what _insert returns, with the fields of those the links settled
        at once."""
        for (keys, _, places), reply in zip(calls, replies):
            prefix = keys[0][:-len("seq")]
            near = set(self._near(prefix, batch))
            held = {int(index) for index, *_ in reply[3]}  # jobs of the unique keys: not new, not linked
            new = [stored[place][0] for i, place in enumerate(places, 1) if i not in held]
            try:
                settled = self._link_far(prefix, new, [job_id for job_id in batch.depends_on
                                                       if job_id not in near])
            except self._server_errors as exc:  # stored, deferred: a heartbeat links them
                logger.warning("enqueue: links of deferred jobs left to a heartbeat: %s", _describe(exc))
                continue
            if settled:
                pipe = self.client.pipeline(transaction=False)
                for place in places:
                    pipe.hgetall(self._job_key(stored[place][0]))
                for place, fields in zip(places, pipe.execute()):
                    stored[place] = (*stored[place][:3], _pairs(fields))
        return stored

    def _link_far(self, prefix: str, job_ids: list[str], dependencies: Iterable[str]) -> bool:
        """Link deferred jobs of shard ``prefix`` to these dependencies, 1000 links a script on
        the dependencies' shards (again, harmlessly, if it was done), settle them for those done
        or gone, and take them out of ``linking``. True if some were settled."""
        by_shard: dict[str, list[str]] = {}
        for dependency in dependencies:
            by_shard.setdefault(self._prefix_of(dependency), []).append(dependency)
        settles: list[Any] = []
        for there, its_own in by_shard.items():
            links = [(dependency, job_id) for dependency in its_own for job_id in job_ids]
            for start in range(0, len(links), 1000):
                settles += self._script(_REDIS_LINK, [there + "seq"], _REDIS_LINK.args(
                    itertools.chain.from_iterable(links[start:start + 1000]), prefix=there))
        ended = False
        for start in range(0, max(len(settles), 1), 500):
            last = start + 500 >= len(settles)
            ended = self._settle_on(prefix, settles[start:start + 500], job_ids if last else []) or ended
        if ended:
            self._settle_ended(prefix)
        return bool(settles)

    def _settle_on(self, prefix: str, settles: list[Any], linked: list[str]) -> bool:
        """Settle deferred jobs of shard ``prefix``: (dependent, dependency, outcome) each. True
        if it cancelled some with dependents of their own, left in the shard's ``ended``."""
        return bool(self._script(_REDIS_SETTLE, [prefix + "deferred"], _REDIS_SETTLE.args(
            itertools.chain.from_iterable(map(_text, settle) for settle in settles), prefix=prefix,
            keep=self._keep_ms(), linked=json.dumps(linked))))

    def _settle_soon(self, prefix: str) -> None:
        """_settle_ended after a step that may have ended jobs with dependents: its server away,
        a heartbeat does it instead, and the step's caller learns that the step was taken."""
        with contextlib.suppress(*self._server_errors):
            self._settle_ended(prefix)

    def _settle_ended(self, prefix: str) -> None:
        """Settle the dependents of the jobs that ended on shard ``prefix`` (its ``ended``
        entries), 500 a script: those on the shard in the script, the others by _settle_on
        before the script forgets them; and in turn those of the shards that settle ended
        more jobs on (a cancel going down the graph): a list of shards worked through, not a
        recursion, however long the graph. One script when nothing is on other shards."""
        pending = [prefix]
        while pending:
            prefix = pending.pop()
            shard, parent = self._prefixes.index(prefix), ""
            far: list[str] = []  # parent's dependents settled on other shards, for the script to forget
            while True:
                entry = self._script(_REDIS_SETTLE_ENDED, [prefix + "ended"], _REDIS_SETTLE_ENDED.args(
                    far, prefix=prefix, shards=len(self._prefixes), shard=shard, keep=self._keep_ms(),
                    parent=parent))
                if not entry:
                    break
                parent, outcome, far = _text(entry[0]), _text(entry[1]), list(map(_text, entry[2]))
                by_shard: dict[str, list[str]] = {}
                for job_id in far:
                    by_shard.setdefault(self._prefix_of(job_id), []).append(job_id)
                for there, ids in by_shard.items():
                    if self._settle_on(there, [(job_id, parent, outcome) for job_id in ids], []) \
                            and there not in pending:
                        pending.append(there)

    def _dependency_upkeep(self, prefix: str, ended: int, kept: list[Any], linking: list[Any]) -> None:
        """What a heartbeat does for dependencies on a shard, after a worker died in the middle:
        settle what ended (its worker died before it did), make the links left unmade (its
        enqueuing caller died), and forget the dependents of results past their ttl that
        are no longer deferred, for those results to expire (100 a beat, picked at random
        among those kept: none is left out for good)."""
        if ended:
            self._settle_ended(prefix)
        for job_id in map(_text, linking):
            fields = self._load(job_id) if self.client.exists(prefix + "job:" + job_id) else {}
            if fields.get("state") == JOB_STATE_DEFERRED:  # all of them again: links are idempotent
                self._link_far(prefix, [job_id], _id_list(fields.get("depends_on", "[]")))
            else:
                self._command("ZREM", prefix + "linking", job_id)
        for job_id in random.sample([_text(job_id) for job_id in kept], min(len(kept), 100)):
            dependents = [_text(d) for d in self.client.smembers(prefix + "dependents:" + job_id)]
            pipe = self.client.pipeline(transaction=False)
            for dependent in dependents:
                pipe.hget(self._job_key(dependent), "state")
            gone = [dependent for dependent, state in zip(dependents, pipe.execute())
                    if state is None or _text(state) != JOB_STATE_DEFERRED]
            if gone:
                self._command("SREM", prefix + "dependents:" + job_id, *gone)

    @staticmethod
    def _cut_short(exc: BaseException, calls: list[Any], replies: list[Any]) -> _NoAnswer:
        """The error of a batch whose first scripts stored their jobs (of several shards, or
        of more than 1000 jobs): whatever failed, the caller learns that some were stored."""
        stored = sum(len(places) - len(reply[3]) for (_, _, places), reply in zip(calls, replies))
        return _NoAnswer(f"{stored} of the {sum(len(places) for _, _, places in calls)} jobs were stored "
                         f"before {_describe(exc)}")

    def _placed(self, count: int, calls: list[tuple[list[str], list[Any], list[int]]], replies: list[Any]
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        """What _insert returns, in the order of its jobs, from the replies of its calls."""
        stored: list[Any] = [None] * count
        for (_, _, places), reply in zip(calls, replies):
            for place, job in zip(places, self._stored(reply, len(places))):
                stored[place] = job
        return stored

    def _enqueue_calls(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                       ) -> list[tuple[list[str], list[Any], list[int]]]:
        """The enqueue script's keys and arguments for each 1000 jobs (well below Lua's limits)
        of each shard, with the places of those jobs in ``jobs``. A batch goes to the next shard
        in turn, or to its first unique key's, and a job with a unique key to its key's: a
        batch is one script unless its unique keys fall on several shards."""
        waiter = "" if batch.waiter_timeout is None else str(int(batch.waiter_timeout * 1000))
        limit = "" if batch.time_limit is None else repr(batch.time_limit)
        keyed = next((key for _, key in jobs if key is not None), None)
        turn = next(self._next_shard) % len(self._prefixes) if keyed is None else self._shard_of_key(keyed)
        places: dict[int, list[int]] = {}
        for place, (_, unique_key) in enumerate(jobs):
            shard = turn if unique_key is None else self._shard_of_key(unique_key)
            places.setdefault(shard, []).append(place)
        calls = []
        for shard, mine in places.items():
            prefix = self._prefixes[shard]
            deps = "" if not batch.depends_on else json.dumps({
                "ids": batch.depends_on, "near": self._near(prefix, batch), "allow": batch.allow_failure,
                "keep": self._keep_ms()})
            head = [prefix, len(self._prefixes), shard, batch.task, batch.stack, waiter,
                    round(batch.delay * 1000), limit, batch.priority, deps]
            # 1000 jobs a script, fewer with dependencies: 1000 links, 20,000 waits stored a script.
            size = max(1, min(1000 // max(len(self._near(prefix, batch)), 1),
                              20_000 // len(batch.depends_on))) if batch.depends_on else 1000
            for start in range(0, len(mine), size):
                some = mine[start:start + size]
                calls.append(([prefix + "seq"], [*head, *itertools.chain.from_iterable(
                    (jobs[place][0], jobs[place][1] or "") for place in some)], some))
        return calls

    def _stored(self, reply: Any, count: int
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        """What _insert returns, from the enqueue script's reply for ``count`` jobs."""
        now, first, due, held, missing, settled = reply
        if missing:
            raise NoSuchJobError(f"no job {_printable(_text(missing))} to depend on")
        enqueued, scheduled = _time(now), _time(due)
        assert enqueued is not None
        holders = {int(index): (_text(job_id), _pairs(fields)) for index, job_id, fields in held}
        for index, fields in settled:  # new jobs a dependency done already settled
            holders[int(index)] = (str(int(first) + (int(index) - 1) * len(self._prefixes)), _pairs(fields))
        stored = []
        for i in range(1, count + 1):
            job_id, fields = holders.get(i, (str(int(first) + (i - 1) * len(self._prefixes)), None))
            stored.append((job_id, enqueued, scheduled, fields))
        return stored

    def _fire(self, schedule: _Schedule, tick: int | None, next_tick: int, batch: _Batch
              ) -> tuple[str | None, int | None]:
        # A schedule's record and jobs live on one shard (its unique key's, if it has one), where
        # one script decides each tick.
        self._check_shards()
        shard = self._shard_of_key(schedule.unique_key or schedule.name)
        prefix = self._prefixes[shard]
        fired, last = self._script(_REDIS_FIRE, [prefix + "periodic"], _REDIS_FIRE.args(
            prefix=prefix, name=schedule.name, tick="" if tick is None else tick, next_tick=next_tick,
            task=schedule.task, expression=schedule.expression, stack=batch.stack, priority=batch.priority,
            params=schedule.params, unique_key=schedule.unique_key or "", shards=len(self._prefixes),
            shard=shard))
        return (_text(fired) if fired else None), (int(last) if last else None)

    def _periodic(self) -> list[Any]:
        records: list[Any] = []
        for prefix in self._prefixes:
            with contextlib.suppress(self._py.response_error):  # not a hash: the next tick replaces it
                records += self.client.hgetall(prefix + "periodic").values()
        return records

    def _check_fit(self) -> None:
        # A worker over the wrong number of shards would claim jobs it can't finish.
        self._check_shards()

    def _claim(self, task_names: list[str], limit: int, worker: str, block: float,
               stopping: threading.Event) -> list[tuple[str, dict[str, Any]]]:
        self._check_shards()
        args = {"limit": limit, "worker": worker, "lease": int(self.lease_timeout * 1000),
                "keep": self._keep_ms()}
        shards = len(self._prefixes)
        drained, self._drained = self._drained, None
        claimed: list[Any]
        if drained is not None and drained[0] == task_names:
            # The last claim emptied these tasks' queues and so deleted their ready keys, which
            # anything enqueued since sets again: wait on them at once. A claim of nothing first
            # would cost a round trip, and a script that the jobs just started wait behind to
            # finish.
            claimed, next_due = [], max(drained[1] - time.monotonic(), 0) * 1000
        else:
            claimed, next_due, now = self._claim_from([(self._turn + i) % shards for i in range(shards)],
                                                      task_names, args)
        if not claimed:
            due_in = next_due / 1000 if 0 <= next_due < block * 1000 else None
            ready = None
            if due_in is not None and due_in <= 0.2:
                # Redis times blocked clients out ten times a second, up to 100 ms late: the
                # last stretch before a due job is waited here instead (and a BZPOPMIN of
                # 0 s would block for good).
                stopping.wait(due_in)
            elif not stopping.is_set():
                ready = self._wait_for_ready(task_names, worker, block if due_in is None else due_in - 0.2)
            claimed, next_due, now = self._claim_from(list(range(shards)) if ready is None else [ready],
                                                      task_names, args)
        if claimed and len(claimed) < limit and shards == 1:
            self._drained = task_names, time.monotonic() + next_due / 1000 if next_due >= 0 else math.inf
        return [(_text(job[0]), {"state": JOB_STATE_RUNNING, "started": now, "worker": worker,
                                 "task": _text(job[1]), "delivery": job[2],
                                 **{name: _text(value) for name, value in zip(_CLAIMED_FIELDS, job[3:])
                                    if value is not None}})
                for job in claimed]

    def _claim_from(self, shards: list[int], task_names: list[str], args: dict[str, Any]
                    ) -> tuple[list[Any], int, int]:
        """Claim from the first of these shards that has jobs, and claim from the next one
        the next time: no shard starves, and a busy worker makes one call per claim. Returns
        the jobs, the milliseconds until the soonest delayed job of the shards it looked at (-1:
        none) and the server's time."""
        # A shard whose master is away is passed over: the others' jobs still run.
        next_due, now, failed = -1, 0, []
        for shard in shards:
            prefix = self._prefixes[shard]
            try:
                claimed, due, now, unclaimable = self._script(
                    _REDIS_CLAIM, [prefix + "running"], _REDIS_CLAIM.args(task_names, prefix=prefix, **args))
            except self._server_errors as exc:
                failed.append(exc)
                continue
            self._unclaimable[prefix] = {_text(task) for task in unclaimable}
            for task in self._unclaimable[prefix]:
                shown = _printable(prefix + "queue:" + task)
                _log_once(f"{shown} (or its ready key) is not a sorted set: its task's jobs can't be claimed")
            if claimed:
                self._turn = shard + 1
                return claimed, int(due), now
            if int(due) >= 0:
                next_due = int(due) if next_due < 0 else min(next_due, int(due))
        if len(failed) == len(shards):
            raise failed[0]
        return [], next_due, now

    def _wait_for_ready(self, task_names: list[str], worker: str, wait: float) -> int | None:
        """Block until a job of these tasks is ready on some shard, or stop() wakes the worker,
        for at most ``wait`` seconds; return that shard, if one is."""
        keys = [[*(prefix + "ready:" + name for name in task_names if name not in self._unclaimable[prefix]),
                 prefix + "wake:" + worker] for prefix in self._prefixes]
        if len(keys) == 1 or not self._cluster:  # one server: one pop over every key
            one = self._command("BZPOPMIN", *itertools.chain.from_iterable(keys), wait, wait=wait)
            return next((shard for shard, its_keys in enumerate(keys)
                         if one and _text(one[0]) in its_keys[:-1]), None)
        # A cluster can't block on keys of several slots in one command: one pop per shard, each
        # on a thread. The first to pop something ends the others through the worker's wake key
        # on their shard, so that no pop outlives the wait to take a ready mark no claim follows.
        answers: SimpleQueue[tuple[int, Any]] = SimpleQueue()

        def pop(shard: int) -> None:
            try:
                answers.put((shard, self._command("BZPOPMIN", *keys[shard], wait, wait=wait)))
            except Exception as exc:  # handed to the waiting thread
                answers.put((shard, exc))
        for shard in range(len(keys)):
            threading.Thread(target=pop, args=(shard,), name="monsterqueue-shard", daemon=True).start()
        popped: dict[int, Any] = {}
        ended: list[int] = []
        while len(popped) < len(keys):
            shard, answer = answers.get()
            popped[shard] = answer
            if answer and not isinstance(answer, Exception) and not ended:
                ended = [other for other in range(len(keys)) if other not in popped]
                for other in ended:
                    with contextlib.suppress(*self._server_errors):
                        self._command("ZADD", keys[other][-1], 0, "end")
                        self._command("PEXPIRE", keys[other][-1], 60_000)
        for shard in ended:  # an "end" its pop didn't take (it took something else first) goes
            answer = popped[shard]
            if isinstance(answer, Exception) or not answer or _text(answer[1]) != "end":
                with contextlib.suppress(*self._server_errors):
                    self._command("ZREM", keys[shard][-1], "end")
        ready = [shard for shard, answer in popped.items()
                 if answer and not isinstance(answer, Exception) and _text(answer[0]) != keys[shard][-1]]
        for shard in ready[1:]:  # one shard is claimed from: the others' marks go back, for other workers
            with contextlib.suppress(*self._server_errors):
                self._command("ZADD", _text(popped[shard][0]), 0, 1)
        failed = [answer for answer in popped.values() if isinstance(answer, Exception)]
        if len(failed) == len(keys):
            raise failed[0]
        return ready[0] if ready else None

    def _finish(self, job: Job, result: str | None, error: str | None, traceback: str | None,
                outcome: str) -> bool | None:
        field, value = ("result", result) if error is None else ("error", error)
        prefix = self._prefix_of(job.id)
        received = self._script(_REDIS_FINISH, [self._job_key(job.id)], _REDIS_FINISH.args(
            prefix=prefix, id=job.id, delivery=job._delivery, outcome=outcome, field=field,
            value=value, keep=self._keep_ms(), traceback=traceback or "", progress=job._progress_text or ""))
        if received == -1:
            return None
        if received & 2:  # its dependents to settle
            self._settle_soon(prefix)
        return bool(received & 1)

    def _retry(self, job: Job, delay: float, traceback: str | None) -> bool | None:
        retried = self._script(_REDIS_RETRY, [self._job_key(job.id)], _REDIS_RETRY.args(
            prefix=self._prefix_of(job.id), id=job.id, delivery=job._delivery, delay=round(delay * 1000),
            traceback=traceback or ""))
        return None if retried == -1 else retried == 1

    def _save_progress(self, progress: dict[Job, str]) -> None:
        # The progress of a shard whose master is away is dropped (its jobs' finish stores their
        # last), so that the beat doesn't log an outage each second while the other shards work;
        # a shard without progress counts as a success: this raises only if every shard failed.
        self._on_shards(self._by_shard(progress), lambda prefix, jobs: jobs and self._script(
            _REDIS_PROGRESS, [prefix + "running"], _REDIS_PROGRESS.args(
                itertools.chain.from_iterable((job.id, job._delivery, progress[job]) for job in jobs),
                prefix=prefix)))

    def _cancel(self, job_id: str) -> bool:
        self._check_shards(record=False)
        prefix = self._prefix_of(job_id)
        state = self._script(_REDIS_CANCEL, [self._job_key(job_id)], _REDIS_CANCEL.args(
            prefix=prefix, id=job_id, keep=self._keep_ms()))
        if state is None:
            raise NoSuchJobError()
        if _text(state) in (JOB_STATE_DEFERRED, JOB_STATE_ENQUEUED):
            self._settle_soon(prefix)
        return _text(state) != JOB_STATE_DONE

    def _bulk(self, action: str, state: str, task_name: str | None) -> int:
        # The candidates first, from a scan of the state's index (bounded work per call,
        # and every member present throughout is seen), so that jobs changed meanwhile
        # can't shift the walk; then the script checks each again, BULK_BATCH per call.
        self._check_shards(record=False)
        index = JOB_STATE_ENQUEUED if state == JOB_STATE_ENQUEUED else "done"
        changed = 0
        try:
            for prefix in self._prefixes:
                members = list({_text(member)
                                for member, _ in self.client.zscan_iter(prefix + index, count=1000)})
                ids = sorted(_done_ids(members, state, task_name) if index == "done" else members,
                             key=lambda job_id: (len(job_id), job_id))  # oldest first
                for start in range(0, len(ids), BULK_BATCH):
                    changed += int(self._script(_REDIS_BULK, [prefix + "jobs"], _REDIS_BULK.args(
                        ids[start:start + BULK_BATCH], prefix=prefix, action=action, state=state,
                        task=task_name or "")))
                self._settle_ended(prefix)  # the dependents of enqueued jobs deleted
        except Exception as exc:
            if changed:  # whatever failed, the caller learns that some jobs were changed
                raise _NoAnswer(f"{changed} jobs were changed before {_describe(exc)}") from exc
            raise
        return changed

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        prefix = self._prefix_of(job.id)
        popped = (self._command("BLPOP", prefix + "outcome:" + job.id, timeout, wait=timeout)
                  if timeout >= 0.001 else None)
        payload = popped[1] if popped else self._script(_REDIS_WITHDRAW, [prefix + "job:" + job.id],
                                                        _REDIS_WITHDRAW.args(prefix=prefix, id=job.id))
        return None if payload is None else self._decode(job.id, _pairs(json.loads(payload)))

    async def _aawait_outcome(self, job: Job, timeout: float) -> Job | None:
        if self._url is None:
            return await super()._aawait_outcome(job, timeout)
        prefix = self._prefix_of(job.id)
        connections = self._aconnections()
        popped = (await connections.client.blpop([prefix + "outcome:" + job.id], timeout)
                  if timeout >= 0.001 else None)
        payload = popped[1] if popped else await connections.ascript(
            _REDIS_WITHDRAW, [prefix + "job:" + job.id], _REDIS_WITHDRAW.args(prefix=prefix, id=job.id))
        return None if payload is None else self._decode(job.id, _pairs(json.loads(payload)))

    async def _aload(self, job_id: str) -> dict[str, Any]:
        if self._url is None:
            return await super()._aload(job_id)
        try:
            fields = await self._aconnections().client.hgetall(self._job_key(job_id))
        except self._py.response_error:
            raise MalformedJobError(f"job {job_id} can't be decoded: it is not a Redis hash") from None
        if not fields:
            raise NoSuchJobError()
        return _pairs(fields)

    def _aconnections(self) -> _Connections:
        """The running event loop's asyncio client, as the sync one but with no read timeout
        (BLPOP waits as long as asked), and the connections kept from it."""
        asyncio_redis = self._py.asyncio()

        def make() -> _Connections:
            client = asyncio_redis.Redis.from_url(
                self._url, decode_responses=True, encoding_errors="surrogateescape",
                socket_connect_timeout=self._connect_timeout, max_connections=2**31,
                retry=asyncio_redis.retry.Retry(self._py.module.backoff.NoBackoff(), 0))
            # No read timeout, neither the URL's socket_timeout (which wins over from_url's own
            # arguments) nor redis-py 8's 5 s: a BLPOP waits as long as asked.
            client.connection_pool.connection_kwargs["socket_timeout"] = None
            return _Connections(client, self._py)
        return self._loop_client(make)

    def _heartbeat(self, worker: str, held: list[Job]) -> list[str]:
        # Each shard keeps its own leases, expiry and list of workers alive: every shard's
        # first, then what dependencies need, which no failure of may cost a lease or a cancel.
        beats = self._on_shards(self._by_shard(held), lambda prefix, jobs: (prefix, self._script(
            _REDIS_HEARTBEAT, [prefix + "running"], _REDIS_HEARTBEAT.args(
                itertools.chain.from_iterable((job.id, job._delivery) for job in jobs), prefix=prefix,
                lease=int(self.lease_timeout * 1000), max_deliveries=self.max_deliveries, ttl=self._ttl_ms(),
                worker=worker, tasks=json.dumps(sorted(self._tasks))))))
        for prefix, (_, *upkeep) in beats:
            try:
                self._dependency_upkeep(prefix, *upkeep)
            except Exception as exc:  # the next beat tries again
                logger.warning("dependencies on %s: %s", _printable(prefix), _describe(exc))
        return [_text(job_id) for _, (ids, *_) in beats for job_id in ids or []]

    def _retire(self, worker: str) -> None:
        # Its wake-ups too: the last ones, sent as it stopped, found it no longer waiting.
        def retire(prefix: str, _: list[Job]) -> Any:
            # One key a DEL: a cluster's pipeline refuses a DEL of several, and its delete()
            # doesn't chain.
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(prefix + "workers", worker)
            for key in ("wake:", "cancels:"):
                pipe.delete(prefix + key + worker)
            return pipe.execute()
        self._on_shards({prefix: [] for prefix in self._prefixes}, retire)

    def _on_shards(self, jobs: dict[str, list[Job]], step: Callable[[str, list[Job]], Any]) -> list[Any]:
        """Take ``step`` on each shard (key prefix) with its jobs and return what each gave.
        A shard whose master is away is passed over, so that the others' leases, cancels and
        progress go on; only if every shard failed is the first error raised."""
        done, failed = [], []
        for prefix, its_jobs in jobs.items():
            try:
                done.append(step(prefix, its_jobs))
            except self._server_errors as exc:
                failed.append(exc)
        if failed and not done:
            raise failed[0]
        return done

    def _interrupt_claim(self, worker: str) -> None:
        wake, cancels = self._key("wake", worker), self._key("cancels", worker)
        self.client.pipeline().zadd(wake, {"stop": 0}).expire(wake, 60).rpush(cancels, "").expire(
            cancels, 60).execute()

    def _await_cancel(self, worker: str, timeout: float) -> bool:
        # On one server one pop waits on every shard's list; a cluster can't pop keys of several
        # slots at once: there the first shard's cancels are pushed, the others' come with the
        # heartbeat.
        if timeout < 0.01:  # BLPOP would take 0 for "for good"
            return False
        prefixes = self._prefixes[:1] if self._cluster else self._prefixes
        popped = self._command("BLPOP", *(prefix + "cancels:" + worker for prefix in prefixes), timeout,
                               wait=timeout)
        return bool(popped) and _text(popped[1]) != ""

    def _load(self, job_id: str) -> dict[str, Any]:
        self._check_shards(record=False)
        try:
            fields = self.client.hgetall(self._job_key(job_id))
        except self._py.response_error:
            raise MalformedJobError(f"job {job_id} can't be decoded: it is not a Redis hash") from None
        if not fields:
            raise NoSuchJobError()
        return _pairs(fields)

    def _dependent_ids(self, job_id: str) -> list[str]:
        members = self.client.smembers(self._prefix_of(job_id) + "dependents:" + job_id)
        return sorted(map(_text, members), key=lambda member: (len(member), member))

    def _list(self, state: str | None, task_name: str | None, limit: int | None, offset: int,
              newest_first: bool) -> list[tuple[str, dict[str, Any]]]:
        self._check_shards(record=False)
        if len(self._prefixes) == 1:
            return self._list_shard(self._prefix, state, task_name, limit, offset, newest_first)
        # The first offset + limit jobs of each shard, merged in the order each shard lists
        # them in: done jobs as their index orders them (by done time, then by member), the
        # others by when they were enqueued (a shard's ids count its own jobs only). Running
        # jobs, few and listed by lease, are all read.
        end = None if limit is None or state == JOB_STATE_RUNNING else offset + limit

        def order(job: tuple[str, dict[str, Any]]) -> tuple[str, str]:
            job_id, fields = job
            if state in (JOB_STATE_DONE, "failed"):
                outcome = "failed" if "error" in fields else "done"
                return fields.get("done", "").zfill(20), f"{outcome}:{fields.get('task', '')}:{job_id}"
            return fields.get("enqueued", "").zfill(20), job_id.zfill(20)
        found = sorted((job for prefix in self._prefixes
                        for job in self._list_shard(prefix, state, task_name, end, 0, newest_first)),
                       key=order, reverse=newest_first)
        return found[offset:None if limit is None else offset + limit]

    def _list_shard(self, prefix: str, state: str | None, task_name: str | None, limit: int | None,
                    offset: int, newest_first: bool) -> list[tuple[str, dict[str, Any]]]:
        # Walk an index in pages and read only the jobs that can be on the page. Done
        # members carry outcome and task, so those filters cost no read; a task and
        # another state walk the smaller of their two indexes, reading to filter.
        index = {None: "jobs", "failed": "done"}.get(state) or str(state)
        member_filter = index == "done" and (state == "failed" or task_name is not None)
        exact = index == "done" or task_name is None
        if task_name is not None and index != "done":
            by_task = f"task:{task_name}"
            exact = index == "jobs"
            if exact or self.client.zcard(prefix + by_task) < self.client.zcard(prefix + index):
                index = by_task
        start, skip = (offset, 0) if exact and not member_filter else (0, offset)
        page = max(min(limit or 1000, 1000), 100)
        found: list[tuple[str, dict[str, Any]]] = []
        while limit is None or len(found) < limit:
            members = [_text(m) for m in (self.client.zrevrange if newest_first else self.client.zrange)(
                prefix + index, start, start + page - 1)]
            if not members:
                break
            start += page
            if index == "done":
                members = _done_ids(members, state, task_name)
            if exact:
                skipped, members = members[:skip], members[skip:]
                skip -= len(skipped)
            pipe = self.client.pipeline(transaction=False)
            for job_id in members:
                pipe.hgetall(prefix + "job:" + job_id)
            for job_id, stored in zip(members, pipe.execute(raise_on_error=False)):
                if not isinstance(stored, dict) or not stored:
                    continue  # deleted or expired since it was indexed, or not a hash
                fields = _pairs(stored)
                if _matches(fields, state, task_name):
                    if skip:
                        skip -= 1
                    else:
                        found.append((job_id, fields))
        return found[:limit]

    def _stats(self) -> _Stats:
        self._check_shards(record=False)
        # Every shard's entries: stats() sums them, and keeps a worker as last seen by any.
        counts: list[tuple[str, Any]] = []
        workers: list[tuple[str, Any, Any]] = []
        metrics: list[tuple[str, Any]] = []
        malformed: list[str] = []
        minutes = _minutes(self._clock_ms())
        per_minute = [0] * len(minutes)
        for prefix in self._prefixes:
            keys = [prefix + "counts", prefix + "workers", prefix + "metrics"]
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            for start in minutes:
                pipe.zcount(prefix + "done", start, start + 59_999)
            its_counts, its_workers, its_metrics, *its_minutes = self._read_all(
                pipe, [*keys, *[prefix + "done"] * len(minutes)], malformed)
            counts += [(_text(key), number) for key, number in (its_counts or {}).items()]
            metrics += [(_text(key), number) for key, number in (its_metrics or {}).items()]
            workers += [(_text(worker), *_text(record).partition(" ")[::2])
                        for worker, record in (its_workers or {}).items()]
            per_minute = [a + (b or 0) for a, b in zip(per_minute, its_minutes)]
            # A task whose keys are of the wrong type holds up none of the others (claims pass
            # it over): said here, as its worker logs it.
            queues = sorted({prefix + kind + _text(key).partition(":")[2] for key in its_counts or {}
                             for kind in ("queue:", "ready:")})
            pipe = self.client.pipeline(transaction=False)
            for key in queues:
                pipe.type(key)
            malformed += [f"{_printable(key)} is a Redis {_text(kind)}, not a sorted set: the jobs of its "
                          f"task can't be claimed" for key, kind in zip(queues, pipe.execute())
                          if _text(kind) not in ("zset", "none")]
        return counts, workers, per_minute, metrics, malformed

    @staticmethod
    def _read_all(pipe: Any, keys: list[str], malformed: list[str]) -> list[Any]:
        """Run a pipeline of reads, one per key: a key of the wrong type is said and read as None."""
        replies = pipe.execute(raise_on_error=False)
        for key, reply in zip(keys, replies):
            if isinstance(reply, Exception):
                malformed.append(f"{_printable(key)} left out: {_printable(str(reply))}")
        return [None if isinstance(reply, Exception) else reply for reply in replies]

    def _answer_lost(self, exc: BaseException) -> bool:
        return isinstance(exc, _NoAnswer)

    def _requeue(self, job_id: str) -> bool:
        self._check_shards(record=False)
        requeued = self._script(_REDIS_REQUEUE, [self._job_key(job_id)],
                                _REDIS_REQUEUE.args(prefix=self._prefix_of(job_id), id=job_id))
        if requeued == 0:
            raise NoSuchJobError()
        return requeued == 1

    def _delete(self, job_id: str) -> bool:
        self._check_shards(record=False)
        prefix = self._prefix_of(job_id)
        deleted = self._script(_REDIS_DELETE, [self._job_key(job_id)],
                               _REDIS_DELETE.args(prefix=prefix, id=job_id))
        if deleted:
            self._settle_soon(prefix)
        return deleted == 1

    def _reset(self) -> None:
        for prefix in self._prefixes:
            # Glob characters in the prefix match only themselves.
            pattern = "".join("\\" + c if c in "*?[]\\{}^-" else c for c in prefix) + "*"
            # The counter stays, and the shards it numbers for: a job id must never be reused,
            # or a worker still running an erased job would record its outcome on a new one.
            keys = [key for key in self.client.scan_iter(match=pattern, count=1000)
                    if _text(key) not in (prefix + "seq", prefix + "shards")]
            for start in range(0, len(keys), 1000):
                self.client.delete(*keys[start:start + 1000])

    def close(self) -> None:
        super().close()
        self._connections.close()
        if self._owns_client:
            self.client.close()


class _RedisPy:
    """What differs between the redis-py versions this supports (4.5.4 on), read once."""

    def __init__(self, redis: Any) -> None:
        import inspect

        self.module = redis
        self.server_errors = (redis.ConnectionError, redis.TimeoutError)
        self.response_error = redis.ResponseError
        # Error replies, read whole: the connection is clean and the command didn't run (a
        # server still loading its data refuses it, though redis-py calls that a ConnectionError).
        self.refusals = (redis.ResponseError, redis.exceptions.BusyLoadingError)
        self.no_script = redis.exceptions.NoScriptError
        # Before 5.3 a pool hands out a connection for a command's name; later it warns of one.
        name = inspect.signature(redis.ConnectionPool.get_connection).parameters.get("command_name")
        self.checkout = ("EVALSHA",) if name is not None and name.default is inspect.Parameter.empty else ()
        self._asyncio: Any = None
        self.async_check = ""

    def asyncio(self) -> Any:
        """redis.asyncio, which redis-py before 5 doesn't import with redis."""
        if self._asyncio is None:
            module = importlib.import_module("redis.asyncio")
            # redis-py 8 renamed the asyncio connection's check that its server didn't close it.
            self.async_check = ("can_read_destructive" if hasattr(module.Connection, "can_read_destructive")
                                else "can_read")
            self._asyncio = module
        return self._asyncio


@functools.cache
def _redis_py(redis: Any) -> _RedisPy:
    return _RedisPy(redis)


class _Connections:
    """A redis-py client's connections, taken once from its pool and kept, one per concurrent
    caller: a command sent through them skips redis-py's per-command costs (~20 us of CPU:
    a pool checkout with a poll of the socket, retries, events). The steps shared by the
    sync and the asyncio client are here once (_take, _keep, _lost); command and acommand
    only carry out the I/O. Other clients (a cluster's) run commands their own way."""

    def __init__(self, client: Any, py: _RedisPy) -> None:
        self.client = client
        pool = getattr(client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", {})
        usable = (pool is not None and getattr(client, "connection", None) is None
                  and kwargs.get("encoding", "utf-8").lower().replace("-", "") == "utf8"
                  and not isinstance(client, py.module.RedisCluster))
        self._pool: Any = pool if usable else None
        self._py = py
        self._spare: list[tuple[Any, float]] = []  # (connection, time.monotonic() when last used)
        self._pid = os.getpid()

    def _take(self) -> tuple[Any, bool] | None:
        """A kept connection, and whether to check first that its server didn't close it; None
        if none is spare."""
        if self._pid != os.getpid():  # forked: never share the parent's sockets
            self._pid, self._spare = os.getpid(), []
        if not self._spare:
            return None
        conn, used = self._spare.pop()
        # A kept connection left idle may have been closed by its server (it died or restarted):
        # reconnect then, so that a failure after sending means "no answer". One in use a
        # moment ago is trusted, to spare the hot path a system call.
        return conn, time.monotonic() - used > IDLE_WAKE_INTERVAL

    def _keep(self, conn: Any) -> None:
        self._spare.append((conn, time.monotonic()))

    def _lost(self, exc: BaseException, sent: bool) -> bool:
        """Whether a command that raised ``exc`` has an unknown outcome (_NoAnswer): its request
        went out and no reply came."""
        return sent and isinstance(exc, self._py.server_errors) and not isinstance(exc, self._py.refusals)

    def command(self, *args: Any, wait: float = 0) -> Any:
        """Send one command and return its raw reply.

        ``wait`` is how long the server may hold the reply (a blocking pop): the read
        waits that much longer than the client's socket timeout.
        """
        if self._pool is None:  # a client passed in times its reads out as it was told to
            return self.client.execute_command(*args)
        conn, check = self._take() or (self._pool.get_connection(*self._py.checkout), False)
        sent = False
        try:
            if check:
                conn.connect()  # a no-op on a live connection
                try:
                    closed = conn.can_read(0)
                except self._py.server_errors:
                    closed = True
                if closed:
                    conn.disconnect()
            conn.send_packed_command((_resp(args),))
            sent = True
            reply = self._read(conn, wait)
        except BaseException as exc:
            if not isinstance(exc, self._py.refusals):  # a reply may be unread: reconnect next time
                conn.disconnect()
            self._keep(conn)
            if self._lost(exc, sent):
                raise _NoAnswer(_describe(exc)) from exc
            raise
        self._keep(conn)
        return reply

    def _read(self, conn: Any, wait: float) -> Any:
        # A blocking pop may hold its reply for ``wait``: wait that much longer than the socket
        # timeout (a URL's socket_timeout may be shorter than the pop), with can_read, which
        # every redis-py has (read_response takes a timeout from redis-py 8 on only).
        if wait and conn.socket_timeout is not None and not conn.can_read(conn.socket_timeout + wait):
            raise self._py.module.TimeoutError("Timeout reading from socket")
        return conn.read_response()

    async def acommand(self, *args: Any) -> Any:
        """command(), on a connection of an asyncio client: its reads wait as long as asked."""
        conn, check = self._take() or (await self._pool.get_connection(*self._py.checkout), False)
        sent = False
        try:
            if check:
                await conn.connect()
                try:
                    closed = await getattr(conn, self._py.async_check)()
                except self._py.server_errors:
                    closed = True
                if closed:
                    await conn.disconnect()
            await conn.send_packed_command(_resp(args))
            sent = True
            reply = await conn.read_response()
        except BaseException as exc:
            self._keep(conn)
            if not isinstance(exc, self._py.refusals):
                await conn.disconnect()
            if self._lost(exc, sent):
                raise _NoAnswer(_describe(exc)) from exc
            raise
        self._keep(conn)
        return reply

    # A script goes by EVALSHA, and whole by EVAL where the server lacks it (it restarted or
    # flushed its scripts: nothing ran; it keeps the script then). Not redis-py's
    # register_script: a cluster client loads a missing script on every master, and would
    # fail it while any master is away.

    def script(self, script: _RedisScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._py.no_script:
            return self.command("EVAL", script.text, len(keys), *keys, *args)

    async def ascript(self, script: _RedisScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.acommand("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._py.no_script:
            return await self.acommand("EVAL", script.text, len(keys), *keys, *args)

    def close(self) -> None:
        spare, self._spare = self._spare, []
        if self._pool is not None and self._pid == os.getpid():
            for conn, _ in spare:
                self._pool.release(conn)


@functools.cache
def _shard_tags(key_prefix: str, shards: int) -> list[str]:
    """The hash tag of each shard of a queue: the key prefix for the first; for shard s, the
    first "PREFIX:K" whose cluster slot lies s/shards of the way round the 16384 slots from
    the first's. A cluster whose N masters hold equal ranges of slots (as redis-cli --cluster
    create splits them) thus holds each of N shards on a master of its own."""
    def slot(tag: str) -> int:  # Redis's CRC16 is CCITT's (XMODEM)
        return binascii.crc_hqx(tag.encode(), 0) % 16384
    first = slot(key_prefix)
    return [key_prefix, *(next(tag for tag in (f"{key_prefix}:{k}" for k in itertools.count())
                               if slot(tag) == (first + round(shard * 16384 / shards)) % 16384)
                          for shard in range(1, shards))]


class _NoAnswer(Exception):
    """A command was sent to Redis and its reply never came: whether it ran is unknown."""


def _resp(args: tuple[Any, ...]) -> bytes:
    """Pack a command in RESP, as redis-py's encoder does for str and int arguments."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = (arg.encode("utf-8", "surrogateescape") if type(arg) is str
                else arg if isinstance(arg, bytes) else repr(arg).encode())
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _done_ids(members: list[str], state: str | None, task_name: str | None) -> list[str]:
    """The ids of the members of the done index ("OUTCOME:TASK:ID") that pass list_jobs' filters."""
    return [m.rsplit(":", 1)[1] for m in members
            if (state != "failed" or m.startswith("failed:"))
            and (task_name is None or m.split(":", 1)[1].rsplit(":", 1)[0] == task_name)]


def _text(value: Any) -> str:
    """A reply as text, as a client made here decodes it: bytes that aren't UTF-8 become
    surrogates, for Queue._decode to refuse and _printable to show."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


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
# Queue._decode with BSON dates for the times, plus ``waiter`` (an
# enqueue_wait caller is waiting), ``worker`` and ``lease`` (who holds it
# while running, and until when), ``unique`` (the unique key, while the job
# isn't done) and ``periodic`` (schedule@tick of a periodic job). A deferred job
# has ``waiting`` (the ids of its dependencies not settled yet) and, until its
# links are made, ``linking``; a job with dependents ``dependents`` (true), and
# ``unsettled`` while some of them are to be settled (see _settle). The index
# (state, task, priority, _id), created with the queue, serves the claim:
# equality on state, $in on the task names, highest priority then oldest
# first; unique partial indexes on (task, unique) and on periodic make the
# server refuse a second holder of a key and a second job for a tick.
#
# A failed job is stored with state "failed" (read back as done with its
# error), so that every listing and count is one equality on state: the
# indexes by_task (task, state, _id) and by_state (state, _id) serve list_jobs
# in _id order and stats' counts, and by_done (done) the jobs done per minute.
#
# Times are the server's: each process reads the offset of its clock from
# hello's localTime (once a minute), and every date it writes or compares
# (leases, due times, expiry, heartbeats) is its clock plus that offset. An
# offset rather than $$NOW in update pipelines, because inserts (enqueue) can't
# run expressions and one rule for every write is simpler.
#
# Round trips per job: enqueue 1 (insert_many, also for enqueue_many); claim 1
# find_one_and_update per job; finish 1 update_one, which also hands the job to
# a waiter (2 if the waiter withdrew since the claim); enqueue_wait 1 find_one
# after its insert and 1 when its job is done, plus 1 update only when it
# times out. Idle workers and waiters don't poll: one change stream per queue
# object (_JobEvents) wakes a worker when a job becomes claimable and a waiter
# when its job is done; where the server refuses change streams (a standalone
# mongod) or while the stream is down, they poll every ``poll_interval``. The
# heartbeat is one update_many per worker per third of a lease, plus one find
# for expired leases.

# The stored states of done jobs: "failed" is read back as done with its error.
_MONGO_DONE = [JOB_STATE_DONE, "failed"]


class MongoQueue(Queue):
    """A queue stored in a MongoDB collection, for many workers."""

    def __init__(self, url: str | None = None, *, database: str | None = None,
                 collection_prefix: str = "monsterqueue", client: Any = None,
                 poll_interval: float = 0.1, change_streams: bool = True,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, **options: Any) -> None:
        super().__init__(**options)
        pymongo = _require("pymongo", "mongo")
        url = url or "mongodb://localhost:27017"
        self._owns_client = client is None  # close() leaves a client passed in to its owner
        # The a* methods make pymongo's asyncio clients (4.9 and later) like the one made from
        # the URL; with a client passed in, or an older pymongo, they run the sync calls on
        # the loop's executor.
        self._url = url if client is None and hasattr(pymongo, "AsyncMongoClient") else None
        self._pymongo, self._connect_timeout = pymongo, connect_timeout
        if client is None:
            client = pymongo.MongoClient(url, tz_aware=True,
                                         serverSelectionTimeoutMS=int(connect_timeout * 1000),
                                         connectTimeoutMS=int(connect_timeout * 1000))
        parsed = pymongo.uri_parser.parse_uri(url)
        database = database or parsed["database"]
        if not database:
            raise ValueError("MongoQueue needs a database: name it in the URL "
                             "(mongodb://host/dbname) or pass database=...")
        self.client = client
        self.poll_interval = poll_interval
        self._server_errors = (pymongo.errors.ConnectionFailure,)
        self._address = ",".join(f"{host}:{port}" for host, port in parsed["nodelist"])
        self._object_id_class = _require("bson", "mongo").ObjectId
        self._after = pymongo.ReturnDocument.AFTER
        self._update_one = pymongo.UpdateOne
        self._no_server = pymongo.errors.ServerSelectionTimeoutError
        self._duplicate = pymongo.errors.DuplicateKeyError
        self._bulk_write_error = pymongo.errors.BulkWriteError
        self._closed_client = pymongo.errors.InvalidOperation
        # Dates read back aware, in UTC, also through a client passed in without tz_aware.
        # Text that isn't UTF-8 is read back with surrogates, for _decode to refuse.
        db = client[database].with_options(codec_options=_require("bson", "mongo").CodecOptions(
            tz_aware=True, tzinfo=timezone.utc, unicode_decode_error_handler="surrogateescape"))
        self._jobs = db[f"{collection_prefix}_jobs"]
        self._workers = db[f"{collection_prefix}_workers"]
        # One document per task: its metrics (see _observe) under "KIND" or "KIND:BUCKET".
        self._metrics = db[f"{collection_prefix}_metrics"]
        self._schedules_fired = db[f"{collection_prefix}_periodic"]
        self._observed: collections.Counter[str] = collections.Counter()  # not yet added to _metrics
        self._observed_lock = threading.Lock()
        self._awaited: set[tuple[str, int]] = set()  # (id, delivery) of held jobs that had a waiter
        self._wakeup = threading.Event()
        self._cancel_pushed = threading.Event()  # the change stream saw a cancel of a running job
        self._events = _JobEvents(self) if change_streams else None
        self._clock_offset, self._clock_read = 0, -math.inf  # ms the server's clock is ahead; when read
        self._indexed = False
        # A queue built while its server is away (at import time, say) fails at
        # its first enqueue instead; its first claim then creates the indexes.
        with contextlib.suppress(*self._server_errors):
            self._create_index()
            self._read_clock()

    def _create_index(self) -> None:
        """Create the claim's index, the listing's, the TTL index that deletes done jobs when
        ``expires`` passes, and the unique indexes that hold a unique key while its job isn't
        done (``unique`` is set only then) and let one job per tick of a schedule in
        (``periodic``)."""
        self._jobs.create_index([("state", 1), ("task", 1), ("priority", -1), ("_id", 1)],
                                name="claim_by_priority")
        self._jobs.create_index([("task", 1), ("state", 1), ("_id", 1)], name="by_task")
        self._jobs.create_index([("state", 1), ("_id", 1)], name="by_state")
        self._jobs.create_index("done", name="by_done", partialFilterExpression={"done": {"$exists": True}})
        self._jobs.create_index("expires", name="expiry", expireAfterSeconds=0)
        for name in ("waiting", "depends_on", "unsettled", "linking"):  # see _settle
            self._jobs.create_index(name, name=name, partialFilterExpression={name: {"$exists": True}})
        self._jobs.create_index([("dependents", 1), ("expires", 1)], name="dependents_expires",
                                partialFilterExpression={"dependents": {"$exists": True}})
        for name, keys in (("unique", [("task", 1), ("unique", 1)]), ("periodic", [("periodic", 1)])):
            self._jobs.create_index(keys, name=name, unique=True,
                                    partialFilterExpression={keys[-1][0]: {"$exists": True}})
        self._indexed = True

    def _read_clock(self) -> None:
        """Read how far the server's clock is ahead of this process's, unless read in the last
        minute. Called by the sync steps only (enqueue, claim, stats, cancel, retry): never on
        an event loop, where aenqueue runs it on the loop's executor."""
        if time.monotonic() - self._clock_read > CLOCK_CHECK_INTERVAL:
            before = _now_ms()
            server = self.client.admin.command("hello")["localTime"].replace(tzinfo=timezone.utc)
            after = _now_ms()
            self._clock_offset = round(server.timestamp() * 1000) - (before + after) // 2
            self._clock_read = time.monotonic()

    def _clock_ms(self) -> int:
        return _now_ms() + self._clock_offset

    def _now(self, later: float = 0.0) -> datetime:
        """The server's time (plus ``later`` seconds), cut to the milliseconds BSON dates keep."""
        return datetime.fromtimestamp((self._clock_ms() + round(later * 1000)) / 1000, timezone.utc)

    def _insert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        self._read_clock()
        if batch.depends_on:
            parents = [self._object_id_class(job_id) for job_id in batch.depends_on
                       if self._object_id_class.is_valid(job_id)]
            found = {str(doc["_id"]) for doc in self._jobs.find({"_id": {"$in": parents}},
                                                                projection={"_id": True})}
            missing = [job_id for job_id in batch.depends_on if job_id not in found]
            if missing:
                raise NoSuchJobError(f"no job {missing[0]} to depend on")
        stored = [self._insert_one(batch, text, key) for text, key in jobs] if any(key for _, key in jobs) \
            else self._insert_many(batch, [text for text, _ in jobs])
        new = [job_id for job_id, _, _, holder in stored if holder is None]  # not a unique key's job
        if batch.depends_on and self._link(new, batch.depends_on):
            docs = {str(doc["_id"]): doc for doc in self._jobs.find(
                {"_id": {"$in": [self._object_id_class(job_id) for job_id, *_ in stored]}})}
            stored = [(job_id, now, due, _mongo_fields(docs[job_id]) if job_id in docs else fields)
                      for job_id, now, due, fields in stored]
        return stored

    def _link(self, job_ids: list[str], depends_on: Iterable[str]) -> bool:
        """Link deferred jobs to their dependencies (again, harmlessly, if it was done): the
        unfinished ones are flagged ``unsettled`` (their finish settles the jobs), and the jobs
        are settled at once for those done or gone; then they leave ``linking``. True if some
        were settled. A dependency that ends meanwhile is flagged first or found done after."""
        parents = [self._object_id_class(job_id) for job_id in depends_on]
        self._jobs.update_many({"_id": {"$in": parents}, "state": {"$nin": _MONGO_DONE}},
                               {"$set": {"dependents": True, "unsettled": True}})
        ended = dict.fromkeys(map(str, parents), "deleted")
        for doc in self._jobs.find({"_id": {"$in": parents}}, projection={"state": True, "outcome": True,
                                                                        "error": True}):
            if doc.get("state") in _MONGO_DONE:
                ended[str(doc["_id"])] = _mongo_outcome(doc)
            else:
                del ended[str(doc["_id"])]
        self._jobs.update_many({"_id": {"$in": [self._object_id_class(job_id) for job_id in ended]}},
                               {"$set": {"dependents": True}})
        for job_id, outcome in ended.items():
            self._settle(job_id, outcome, job_ids)
        self._jobs.update_many({"_id": {"$in": [self._object_id_class(job_id) for job_id in job_ids]}},
                               {"$unset": {"linking": ""}})
        return bool(ended)

    def _settle(self, parent_id: str, outcome: str, only: list[str] | None = None) -> None:
        """Settle the deferred jobs (of ``only``, else all) that wait for the job ``parent_id``,
        which ended with ``outcome``, and those it cancels in turn, then unflag it. Each step is
        one update that finds only what is still to do: a heartbeat that takes it again after a
        worker died in the middle (the job is still ``unsettled``) does the rest, once."""
        ended = [(parent_id, outcome)]
        while ended:
            parent_id, outcome = ended.pop()
            parent = self._object_id_class(parent_id)
            waiting = {"waiting": parent, "state": JOB_STATE_DEFERRED,
                       **({} if only is None else {"_id": {"$in": [self._object_id_class(i) for i in only]}})}
            if outcome != "succeeded":
                for doc in self._jobs.find({**waiting, "allow_failure": {"$ne": True}},
                                           projection={"task": True, "unsettled": True}):
                    if self._jobs.update_one({**waiting, "_id": doc["_id"]}, {
                            "$set": {"state": "failed", "done": self._now(), "outcome": "cancelled",
                                     "error": DEPENDENCY_ENDED % (parent_id, outcome), "waiter": False,
                                     **self._expiry()},
                            "$unset": {"unique": "", "waiting": ""}}).matched_count:
                        self._add_metrics({f"finished:{doc['task']}": 1, f"failed:{doc['task']}": 1})
                        if doc.get("unsettled"):
                            ended.append((str(doc["_id"]), "cancelled"))
            self._jobs.update_many(waiting, {"$pull": {"waiting": parent}})
            self._jobs.update_many(
                {"depends_on": parent_id, "state": JOB_STATE_DEFERRED, "waiting": {"$size": 0}},
                {"$set": {"state": JOB_STATE_ENQUEUED}, "$unset": {"waiting": ""}})
            if only is None:  # what a delete settles has no document left to unflag
                self._jobs.update_one({"_id": parent, "state": {"$in": _MONGO_DONE}},
                                      {"$unset": {"unsettled": ""}})
            only = None

    def _documents(self, batch: _Batch, texts: list[str]) -> tuple[datetime, datetime, list[dict[str, Any]]]:
        now = self._now()
        due = now + timedelta(milliseconds=round(batch.delay * 1000))
        limit = {} if batch.time_limit is None else {"time_limit": batch.time_limit}
        deferred = {"state": JOB_STATE_DEFERRED, "depends_on": list(batch.depends_on),
                    "waiting": [self._object_id_class(job_id) for job_id in batch.depends_on], "linking": now,
                    **({"allow_failure": True} if batch.allow_failure else {})} if batch.depends_on else {}
        return now, due, [{"task": batch.task, "params": text, "state": JOB_STATE_ENQUEUED, "enqueued": now,
                           "due": due, "stack": batch.stack, "delivery": 0, "attempt": 1,
                           "waiter": batch.waiter_timeout is not None, "priority": batch.priority, **limit,
                           **deferred}
                          for text in texts]

    def _insert_many(self, batch: _Batch, texts: list[str]
                     ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        now, due, docs = self._documents(batch, texts)
        ids = self._jobs.insert_many(docs).inserted_ids
        return [(str(job_id), now, due if batch.delay else None, None) for job_id in ids]

    def _insert_one(self, batch: _Batch, text: str, unique_key: str | None, **extra: Any
                    ) -> tuple[str, datetime, datetime | None, dict[str, Any] | None]:
        """Insert one job, holding its unique key (``unique``, unset when it is done) if it has
        one; the unique index refuses it if an unfinished job holds the key, and that job is
        returned instead."""
        while True:
            now, due, (doc,) = self._documents(batch, [text])
            if unique_key:
                doc.update(unique_key=unique_key, unique=unique_key)
            try:
                job_id = self._jobs.insert_one({**doc, **extra}).inserted_id
                return str(job_id), now, due if batch.delay else None, None
            except self._duplicate as exc:
                if unique_key is None or "periodic" in (exc.details or {}).get("keyPattern", {"periodic": 1}):
                    raise  # this tick's job exists (or the server didn't say which index refused it)
            holder = self._jobs.find_one({"task": batch.task, "unique": unique_key})
            if holder is not None:  # else it finished meanwhile: the key is free
                return str(holder["_id"]), now, None, _mongo_fields(holder)

    def _fire(self, schedule: _Schedule, tick: int | None, next_tick: int, batch: _Batch
              ) -> tuple[str | None, int | None]:
        # The unique index on "periodic" lets one job per tick in: that insert decides.
        job_id = None
        if tick is not None:
            with contextlib.suppress(self._duplicate):
                job_id, *_ = self._insert_one(batch, schedule.params, schedule.unique_key,
                                              periodic=f"{schedule.name}@{tick}")
        record = {"task": schedule.task, "schedule": schedule.expression, "next": _time(next_tick)}
        before = self._schedules_fired.find_one_and_update(
            {"_id": schedule.name}, {"$set": record}, upsert=True, projection={"last": True})
        last = _mongo_fields(before or {}).get("last")
        if job_id is not None:
            self._schedules_fired.update_one({"_id": schedule.name, "last": {"$not": {"$gte": _time(tick)}}},
                                             {"$set": {"last": _time(tick), "last_job": job_id}})
        return job_id, last

    def _periodic(self) -> list[Any]:
        return [{"name": doc["_id"], **_mongo_fields(doc)} for doc in self._schedules_fired.find()]

    def _claim(self, task_names: list[str], limit: int, worker: str, block: float,
               stopping: threading.Event) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self._indexed:
            self._create_index()
        self._read_clock()
        events = self._events if self._events is not None and self._events.pushing() else None
        self._wakeup.clear()  # before the claim: a wake-up pushed while it runs is kept
        if stopping.is_set():
            return  # stop() came before the clear
        # With the stream, claim as many jobs as it announced: an idle worker woken for one
        # job makes one round trip, not a second that finds nothing. Those left over (more
        # than ``limit``, or of the tasks not claimed for now) are claimed next time.
        announced = limit if events is None else events.take()
        wanted = int(min(limit, announced))
        try:
            claimed = (yield from self._claim_now(task_names, wanted, worker)) if wanted else 0
        except BaseException:
            if events is not None:
                events.announce(announced)  # for the next try: too many costs one empty claim
            raise
        # Claiming for one kind of task (the other's places are full): keep the rest.
        one_kind = len(task_names) < len(self._tasks)
        if events is not None and (claimed == wanted or one_kind):
            events.announce(announced - claimed)
        if claimed:
            return
        wait = self.poll_interval if events is None else events.until_due()
        if one_kind:  # nothing pushes when a place of the other kind frees
            wait = min(wait, self.poll_interval)
        # Woken: back to the loop, which claims at once unless stop() woke it. Else a
        # delayed job is due, or it is the poll (the stream's safety net, each ``block``).
        if wait <= 0 or not self._wakeup.wait(min(block, wait)):
            claimed = yield from self._claim_now(task_names, limit, worker)
            if events is not None and claimed == limit:
                events.announce(math.inf)  # jobs that came due may be left

    def _claim_now(self, task_names: list[str], limit: int,
                   worker: str) -> Generator[tuple[str, dict[str, Any]], None, int]:
        """Claim one job per round trip, up to ``limit``; return how many."""
        for claimed in range(limit):
            now = self._now()
            doc = self._jobs.find_one_and_update(
                {"state": JOB_STATE_ENQUEUED, "task": {"$in": task_names}, "due": {"$lte": now}},
                {"$set": {"state": JOB_STATE_RUNNING, "started": now, "worker": worker,
                          "lease": now + timedelta(seconds=self.lease_timeout)},
                 "$inc": {"delivery": 1}},
                sort=[("priority", -1), ("_id", 1)], hint="claim_by_priority", return_document=self._after)
            if doc is None:
                return claimed
            if doc.get("waiter"):
                self._awaited.add((str(doc["_id"]), doc["delivery"]))
            yield str(doc["_id"]), _mongo_fields(doc)
        return limit

    def _holding(self, job: Job) -> dict[str, Any]:
        """The filter that matches the job only while this delivery of it holds it."""
        return {"_id": self._object_id_class(job.id), "state": JOB_STATE_RUNNING,
                "delivery": job._delivery}

    def _finish(self, job: Job, result: str | None, error: str | None, traceback: str | None,
                outcome: str) -> bool | None:
        # The waiter flag is decided by each update's filter, not by reading it back,
        # so that this and the waiter's withdrawal can't both win. The flag only ever
        # goes from true to false, so a job claimed without a waiter, the usual case,
        # needs one update, and one claimed with a waiter a second only if it withdrew.
        awaited = (job.id, job._delivery) in self._awaited
        now = self._now()
        done = {"$set": {"state": JOB_STATE_DONE if error is None else "failed", "done": now,
                         "outcome": outcome, "result": result, "error": error, "waiter": False,
                         **self._expiry(),
                         **_set_if("traceback", traceback), **_set_if("progress", job._progress_text)},
                "$unset": {"worker": "", "lease": "", "unique": "",
                           **({} if traceback else {"traceback": ""})}}
        # Likewise a job with dependents to settle, the rare case, is found by a second filter.
        for waiter, flag in ((True, True), (False, {"$ne": True}))[0 if awaited else 1:]:
            for unsettled in (False, True):
                if self._jobs.update_one({**self._holding(job), "waiter": flag,
                                          "unsettled": unsettled or {"$ne": True}}, done).matched_count:
                    self._awaited.discard((job.id, job._delivery))
                    self._observe(job.task_name, error is not None, job.status.started,
                                  job.status.scheduled or job.status.enqueued, now)
                    if unsettled:  # at once, or by a heartbeat if the server is away
                        with contextlib.suppress(*self._server_errors):
                            self._settle(job.id, outcome)
                    return waiter
        self._awaited.discard((job.id, job._delivery))  # no longer held by this delivery
        return None

    def _observe(self, task: str, failed: bool, started: datetime | None, due: datetime | None,
                 now: datetime) -> None:
        """Count a finished job into the metrics, as Redis's finish does: here, and added to the
        server by the next heartbeat, since one update can't change the job and its task's
        metrics both."""
        run_ms = None if started is None else round((now - started).total_seconds() * 1000)
        wait_ms = None if started is None or due is None else round((started - due).total_seconds() * 1000)
        with self._observed_lock:
            _observe(self._observed, task, failed, run_ms, wait_ms)

    def _retry(self, job: Job, delay: float, traceback: str | None) -> bool | None:
        retried = self._jobs.update_one(
            {**self._holding(job), "cancel": {"$ne": True}},
            {"$set": {"state": JOB_STATE_ENQUEUED, "due": self._now(delay),
                      **_set_if("traceback", traceback)},
             "$unset": {"started": "", "worker": "", "lease": "", **({} if traceback else {"traceback": ""})},
             "$inc": {"attempt": 1}})
        if retried.modified_count:
            self._awaited.discard((job.id, job._delivery))
            return True
        # Cancelled while it ran (False), or no longer held (None).
        return False if self._jobs.count_documents({**self._holding(job), "cancel": True}, limit=1) else None

    def _save_progress(self, progress: dict[Job, str]) -> None:
        self._jobs.bulk_write([self._update_one(self._holding(job), {"$set": {"progress": text}})
                               for job, text in progress.items()], ordered=False)

    def _cancel(self, job_id: str) -> bool:
        self._read_clock()
        query = {"_id": self._object_id(job_id)}
        while True:  # again if it moved between running and enqueued meanwhile
            before = self._jobs.find_one_and_update(
                {**query, "state": {"$in": [JOB_STATE_DEFERRED, JOB_STATE_ENQUEUED]}},
                {"$set": {"state": "failed", "done": self._now(), "outcome": "cancelled",
                          "error": CANCELLED_BEFORE_IT_RAN,
                          "waiter": False, **self._expiry()}, "$unset": {"unique": "", "waiting": ""}},
                projection={"task": True, "unsettled": True})
            if before is not None:
                self._add_metrics({f"finished:{before['task']}": 1, f"failed:{before['task']}": 1})
                if before.get("unsettled"):
                    self._settle(job_id, "cancelled")
                return True
            if self._jobs.update_one({**query, "state": JOB_STATE_RUNNING},
                                     {"$set": {"cancel": True}}).matched_count:
                return True
            doc = self._jobs.find_one(query, projection={"state": True})
            if doc is None:
                raise NoSuchJobError()
            if doc.get("state") in _MONGO_DONE:
                return False

    def _bulk(self, action: str, state: str, task_name: str | None) -> int:
        # One command: MongoDB changes the documents one at a time, blocking no other request.
        query = _mongo_query(state, task_name)
        if action == "retry":
            retried = int(self._jobs.update_many(query, self._requeued()).modified_count)
            self._retake_unique_keys({} if task_name is None else {"task": task_name})
            return retried
        # Those with dependents one by one, as _delete does (a link flags a job atomically: one
        # flagged after this delete_many looked was not deleted by it).
        deleted = int(self._jobs.delete_many({**query, "dependents": {"$ne": True}}).deleted_count)
        for doc in self._jobs.find({**query, "dependents": True}, projection={"_id": True}):
            deleted += self._delete(str(doc["_id"]))
        return deleted

    def _await_outcome(self, job: Job, timeout: float) -> Job | None:
        # Read the job when the change stream says it is done (else from 5 ms backing off
        # to poll_interval), through outages of the server; on a timeout withdraw the
        # waiter, unless the outcome was handed meanwhile.
        query, woken, doc = {"_id": self._object_id_class(job.id)}, threading.Event(), None
        deadline, pauses = time.monotonic() + timeout, self._pauses()
        with self._woken_by(job.id, woken.set):
            while True:
                woken.clear()
                with contextlib.suppress(*self._server_errors):
                    doc = self._jobs.find_one(query)
                left = deadline - time.monotonic()
                if self._handed(doc) or left <= 0:
                    break
                woken.wait(min(next(pauses), left))
        if not self._handed(doc) and (self._jobs.update_one({**query, "waiter": True},
                                                            {"$set": {"waiter": False}}).modified_count
                                      or doc is None):
            return None
        return self._outcome(job, doc if self._handed(doc) else self._jobs.find_one(query))

    async def _aawait_outcome(self, job: Job, timeout: float) -> Job | None:
        if self._url is None:
            return await super()._aawait_outcome(job, timeout)
        import asyncio

        jobs, query, doc = self._ajobs(), {"_id": self._object_id_class(job.id)}, None
        loop, woken = asyncio.get_running_loop(), asyncio.Event()
        deadline, pauses = time.monotonic() + timeout, self._pauses()
        with self._woken_by(job.id, lambda: loop.call_soon_threadsafe(woken.set)):
            while True:
                woken.clear()
                with contextlib.suppress(*self._server_errors):
                    doc = await jobs.find_one(query)
                left = deadline - time.monotonic()
                if self._handed(doc) or left <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(next(pauses), left))
        if not self._handed(doc) and ((await jobs.update_one({**query, "waiter": True},
                                                             {"$set": {"waiter": False}})).modified_count
                                      or doc is None):
            return None
        return self._outcome(job, doc if self._handed(doc) else await jobs.find_one(query))

    @contextlib.contextmanager
    def _woken_by(self, job_id: str, wake: Callable[[], object]) -> Iterator[None]:
        """Have the change stream call ``wake`` when the job is done or deleted, for the with-block."""
        if self._events is None:
            yield
            return
        self._events.watch(job_id, wake)
        try:
            yield
        finally:
            self._events.unwatch(job_id, wake)

    def _pauses(self) -> Iterator[float]:
        """A waiter's pauses between reads: a second while the change stream pushes (it is
        woken sooner), else from 5 ms doubling up to poll_interval."""
        pause = 0.005
        while True:
            yield IDLE_WAKE_INTERVAL if self._events is not None and self._events.pushing() else pause
            pause = min(pause * 2, self.poll_interval)

    @staticmethod
    def _handed(doc: dict[str, Any] | None) -> bool:
        return doc is not None and doc["state"] in _MONGO_DONE and not doc.get("waiter")

    def _outcome(self, job: Job, doc: dict[str, Any] | None) -> Job | None:
        return None if doc is None else self._decode(job.id, _mongo_fields(doc))  # None: deleted meanwhile

    async def _ainsert(self, batch: _Batch, jobs: list[tuple[str, str | None]]
                       ) -> list[tuple[str, datetime, datetime | None, dict[str, Any] | None]]:
        if self._url is None or batch.depends_on or any(key for _, key in jobs):  # the executor's thread
            return await super()._ainsert(batch, jobs)
        if time.monotonic() - self._clock_read > CLOCK_CHECK_INTERVAL:  # read off the event loop
            import asyncio
            await asyncio.get_running_loop().run_in_executor(None, self._read_clock)
        now, due, docs = self._documents(batch, [text for text, _ in jobs])
        ids = (await self._ajobs().insert_many(docs)).inserted_ids
        return [(str(job_id), now, due if batch.delay else None, None) for job_id in ids]

    async def _aload(self, job_id: str) -> dict[str, Any]:
        if self._url is None:
            return await super()._aload(job_id)
        doc = await self._ajobs().find_one({"_id": self._object_id(job_id)})
        if doc is None:
            raise NoSuchJobError()
        return _mongo_fields(doc)

    def _ajobs(self) -> Any:
        """The jobs collection, through the running event loop's asyncio client."""
        ms = int(self._connect_timeout * 1000)
        client = self._loop_client(lambda: self._pymongo.AsyncMongoClient(
            self._url, tz_aware=True, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms))
        return client[self._jobs.database.name].get_collection(self._jobs.name,
                                                              codec_options=self._jobs.codec_options)

    def _expiry(self) -> dict[str, datetime]:
        return {"expires": self._now(self.result_ttl)} if self.result_ttl else {}

    def _heartbeat(self, worker: str, held: list[Job]) -> list[str]:
        now = self._now()
        self._workers.replace_one({"_id": worker}, {"seen": now, "tasks": sorted(self._tasks)}, upsert=True)
        self._workers.delete_many({"seen": {"$lt": self._now(-WORKER_ALIVE_LEASES * self.lease_timeout)}})
        cancelled = []
        if held:
            mine = {"_id": {"$in": [self._object_id_class(job.id) for job in held]},
                    "state": JOB_STATE_RUNNING, "worker": worker}
            self._jobs.update_many(mine, {"$set": {"lease": self._now(self.lease_timeout)}})
            cancelled = [str(doc["_id"]) for doc in self._jobs.find({**mine, "cancel": True},
                                                                    projection={"_id": True})]
        for doc in self._jobs.find({"state": JOB_STATE_RUNNING, "lease": {"$lt": now}},
                                   projection={"delivery": True, "lost": True, "cancel": True, "task": True,
                                               "started": True, "due": True, "unsettled": True}):
            expired = {"_id": doc["_id"], "state": JOB_STATE_RUNNING, "delivery": doc["delivery"],
                       "lease": {"$lt": now}}
            # Lost leases are counted apart from deliveries: retries deliver a job again too.
            lost = doc.get("lost", 0) + 1
            error = (CANCELLED_WHILE_RUNNING if doc.get("cancel") else
                     POISON_ERROR % (doc["delivery"], lost) if lost >= self.max_deliveries else None)
            if error is not None:
                if self._jobs.update_one(expired, {
                        "$set": {"state": "failed", "done": now, "waiter": False, "lost": lost,
                                 **self._expiry(), "error": error,
                                 "outcome": "cancelled" if doc.get("cancel") else "failed"},
                        "$unset": {"worker": "", "lease": "", "unique": ""}}).matched_count:
                    self._observe(doc.get("task", ""), True, doc.get("started"), doc.get("due"), now)
                    if doc.get("unsettled"):
                        self._settle(str(doc["_id"]), "cancelled" if doc.get("cancel") else "failed")
            else:
                self._jobs.update_one(expired, {"$set": {"state": JOB_STATE_ENQUEUED, "lost": lost},
                                                "$unset": {"started": "", "worker": "", "lease": ""}})
        # A job whose state is no job state is never claimed: failed, as a record that can't be
        # read is. The index's bounds skip every job in a state of its own.
        states = [JOB_STATE_DEFERRED, JOB_STATE_ENQUEUED, JOB_STATE_RUNNING, *_MONGO_DONE]
        for doc in self._jobs.find({"state": {"$nin": states}},
                                   projection={"state": True}, hint="by_state"):
            self._jobs.update_one({"_id": doc["_id"], "state": doc.get("state")}, {
                "$set": {"state": "failed", "done": now, "waiter": False, **self._expiry(),
                         "outcome": "failed",
                         "error": f"the stored job has a state that is no job state: {doc.get('state')!r}"},
                "$unset": {"worker": "", "lease": "", "unique": ""}})
        self._dependency_upkeep(now)
        self._add_observed()  # last: the leases above matter more
        return cancelled

    def _dependency_upkeep(self, now: datetime) -> None:
        """What a heartbeat does for dependencies, after a worker died in the middle: settle the
        dependents of jobs that ended (their worker died before it did), make the links left
        unmade (the enqueuing caller died), and keep the results that a deferred job needs
        past their expiry, a result_ttl at a time."""
        for doc in self._jobs.find({"unsettled": True, "state": {"$in": _MONGO_DONE}},
                                   projection={"outcome": True, "error": True}, hint="unsettled"):
            self._settle(str(doc["_id"]), _mongo_outcome(doc))
        for doc in self._jobs.find({"linking": {"$lt": self._now(-self.lease_timeout)}},
                                   projection={"depends_on": True}, hint="linking"):
            self._link([str(doc["_id"])], doc.get("depends_on") or [])
        if self.result_ttl:
            soon = self._now(3 * self.lease_timeout)
            needed = {"dependents": True, "expires": {"$lt": soon}}
            for doc in self._jobs.find(needed, projection={"_id": True}, hint="dependents_expires"):
                if self._jobs.count_documents({"depends_on": str(doc["_id"]), "state": JOB_STATE_DEFERRED},
                                              limit=1):
                    self._jobs.update_one({"_id": doc["_id"]}, {"$set": self._expiry()})

    def _add_observed(self) -> None:
        """Add what this worker's finishes counted to the metrics; kept for the next try if the
        server surely didn't add them."""
        with self._observed_lock:
            observed, self._observed = self._observed, collections.Counter()
        if not observed:
            return
        try:
            self._add_metrics(observed)
        except self._server_errors as exc:
            if not self._answer_lost(exc):
                with self._observed_lock:
                    self._observed.update(observed)
            raise

    def _add_metrics(self, metrics: dict[str, int]) -> None:
        by_task: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for key, number in metrics.items():
            task, field = _metric_of(key)
            by_task[task][field] = number
        self._metrics.bulk_write([self._update_one({"_id": task}, {"$inc": fields}, upsert=True)
                                  for task, fields in by_task.items()])

    def _retire(self, worker: str) -> None:
        self._workers.delete_one({"_id": worker})
        self._add_observed()

    def _interrupt_claim(self, worker: str) -> None:
        self._wakeup.set()
        self._cancel_pushed.set()

    def _await_cancel(self, worker: str, timeout: float) -> bool:
        pushed = self._cancel_pushed.wait(timeout)
        self._cancel_pushed.clear()
        if pushed or (self._events is not None and self._events.pushing()):
            return pushed
        # Without the change stream, a look for its cancelled jobs after each wait.
        return self._jobs.find_one({"state": JOB_STATE_RUNNING, "worker": worker, "cancel": True},
                                   projection={"_id": True}) is not None

    def _object_id(self, job_id: str) -> Any:
        if not self._object_id_class.is_valid(job_id):
            raise NoSuchJobError()
        return self._object_id_class(job_id)

    def _load(self, job_id: str) -> dict[str, Any]:
        doc = self._jobs.find_one({"_id": self._object_id(job_id)})
        if doc is None:
            raise NoSuchJobError()
        return _mongo_fields(doc)

    def _dependent_ids(self, job_id: str) -> list[str]:
        return [str(doc["_id"]) for doc in self._jobs.find({"depends_on": job_id}, projection={"_id": True},
                                                           hint="depends_on").sort("_id", 1)]

    def _list(self, state: str | None, task_name: str | None, limit: int | None, offset: int,
              newest_first: bool) -> list[tuple[str, dict[str, Any]]]:
        query = _mongo_query(state, task_name)
        # With no filter, the _id index is named: some servers (SecantusDB) would scan otherwise.
        found = self._jobs.find(query, hint=None if query else "_id_").sort("_id", -1 if newest_first else 1)
        found = found.skip(offset).limit(limit or 0)
        return [(str(doc["_id"]), _mongo_fields(doc)) for doc in found]

    def _stats(self) -> _Stats:
        if not self._indexed:
            self._create_index()
        self._read_clock()
        # Both aggregations read only their index's keys; with no filter to go by, the
        # server would scan the collection unless told which index.
        groups = self._jobs.aggregate([{"$group": {"_id": {"state": "$state", "task": "$task"},
                                                   "n": {"$sum": 1}}}], hint="by_task")
        counts = [(f"{group['_id'].get('state')}:{group['_id'].get('task')}", group["n"]) for group in groups]
        minutes = _minutes(self._clock_ms())
        done = {"$toLong": "$done"}
        per_minute = [0] * len(minutes)
        for group in self._jobs.aggregate([{"$match": {"done": {"$gte": _time(minutes[0])}}}, {"$group": {
                "_id": {"$subtract": [done, {"$mod": [done, 60_000]}]}, "n": {"$sum": 1}}}], hint="by_done"):
            if minutes[0] <= group["_id"] <= minutes[-1]:
                per_minute[(group["_id"] - minutes[0]) // 60_000] += group["n"]
        workers = [(str(doc["_id"]), doc.get("seen"), doc.get("tasks"))
                   for doc in self._workers.find(
                       {"seen": {"$gte": self._now(-WORKER_ALIVE_LEASES * self.lease_timeout)}})]
        metrics = [(_metric_key(str(doc["_id"]), field), number) for doc in self._metrics.find()
                   for field, number in doc.items() if field != "_id"]
        return counts, workers, per_minute, metrics, []

    def _requeue(self, job_id: str) -> bool:
        requeued = self._jobs.update_one({"_id": self._object_id(job_id), "state": {"$in": _MONGO_DONE}},
                                         self._requeued())
        if not requeued.matched_count and not self._jobs.count_documents({"_id": self._object_id(job_id)}):
            raise NoSuchJobError()
        self._retake_unique_keys({"_id": self._object_id(job_id)})
        return bool(requeued.matched_count)

    def _requeued(self) -> dict[str, Any]:
        """What retry_job and retry_jobs do to a done job: enqueued again from its first attempt,
        due now (its queue wait counts from here)."""
        self._read_clock()
        return {"$set": {"state": JOB_STATE_ENQUEUED, "attempt": 1, "due": self._now()},
                "$unset": dict.fromkeys(("started", "expires", *REQUEUE_CLEARS), "")}

    def _retake_unique_keys(self, query: dict[str, Any]) -> None:
        """Let retried jobs hold their unique keys again, each unless an unfinished job took it."""
        for doc in self._jobs.find({**query, "state": JOB_STATE_ENQUEUED, "unique_key": {"$exists": True},
                                    "unique": {"$exists": False}}, projection={"unique_key": True}):
            with contextlib.suppress(self._duplicate):
                self._jobs.update_one({"_id": doc["_id"]}, {"$set": {"unique": doc["unique_key"]}})

    def _delete(self, job_id: str) -> bool:
        try:
            query = {"_id": self._object_id(job_id)}
        except NoSuchJobError:
            return False
        # The flags read in the delete's own step: a link made before it flagged the job, one
        # after finds it gone (and settles as "deleted").
        doc = self._jobs.find_one_and_delete(query, projection={"state": True, "outcome": True, "error": True,
                                                                "unsettled": True})
        if doc is not None and doc.get("unsettled"):
            done = doc.get("state") in _MONGO_DONE
            self._settle(job_id, _mongo_outcome(doc) if done else "deleted")
        return doc is not None

    def _reset(self) -> None:
        self._jobs.delete_many({})
        self._workers.delete_many({})
        self._metrics.delete_many({})
        self._schedules_fired.delete_many({})

    def _answer_lost(self, exc: BaseException) -> bool:
        # Only a server that was never found surely got nothing.
        return not isinstance(exc, self._no_server)

    def close(self) -> None:
        super().close()
        if self._events is not None:
            self._events.close()
        if self._owns_client:
            self.client.close()


# What the change stream of the jobs carries: new jobs, jobs claimable again or
# done, deleted jobs; cut to the fields _JobEvents reads.
_MONGO_EVENTS = [
    {"$match": {"$or": [{"operationType": {"$in": ["insert", "delete"]}},
                        {"operationType": "update", "updateDescription.updatedFields.state": {
                            "$in": [JOB_STATE_ENQUEUED, *_MONGO_DONE]}},
                        {"operationType": "update", "updateDescription.updatedFields.cancel": True}]}},
    {"$project": {"operationType": True, "documentKey": True, "fullDocument.task": True,
                  "fullDocument.due": True, "updateDescription.updatedFields.state": True,
                  "updateDescription.updatedFields.due": True,
                  "updateDescription.updatedFields.cancel": True}}]

# The codes of a server that has no change streams: a standalone mongod (40573),
# one that doesn't know the stage (40324) or the command (115).
_STREAMS_REFUSED = (40573, 40324, 115)


class _JobEvents:
    """The change stream of a MongoQueue's jobs, read by a thread from the first wait on:
    it wakes the idle worker when a job becomes claimable (and keeps the due times of
    delayed ones) and each enqueue_wait caller when its job is done or deleted.

    Whenever the stream opens or reopens, every waiter and the worker are woken to
    read again: what happened while it was closed is found by reading, so no wake-up
    is lost, resume token or not. While it is down, and for good where the server
    refuses change streams, they poll."""

    def __init__(self, queue: MongoQueue) -> None:
        self._queue = queue
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Callable[[], object]]] = {}  # job id: its waiters' wake-ups
        self._dues: list[int] = []  # a heap of the due times (server ms) of delayed jobs seen
        self._look_for_due = True  # whether to read the soonest due time of the collection
        self._looked: int | None = None  # the due time that read found
        self._announced: float = 0  # claimable jobs pushed since the worker last asked
        self._thread: threading.Thread | None = None
        self._live = False
        self._closed = threading.Event()

    def pushing(self) -> bool:
        """Whether the stream is open; the first call opens it."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._read, name="monsterqueue-changes", daemon=True)
                self._thread.start()
            return self._live

    def watch(self, job_id: str, wake: Callable[[], object]) -> None:
        with self._lock:
            self._waiters.setdefault(job_id, []).append(wake)

    def unwatch(self, job_id: str, wake: Callable[[], object]) -> None:
        with self._lock:
            wakes = self._waiters[job_id]
            wakes.remove(wake)
            if not wakes:
                del self._waiters[job_id]

    def take(self) -> float:
        """How many jobs became claimable since the last call (inf: unknown, the stream opened)."""
        with self._lock:
            announced, self._announced = self._announced, 0
            return announced

    def announce(self, jobs: float) -> None:
        with self._lock:
            self._announced += jobs

    def until_due(self) -> float:
        """Seconds until the soonest due time known of a delayed job of this worker's tasks (0
        if one passed since the last call). The jobs delayed before the stream opened are read
        from the collection, the soonest at a time: when it opened, and when that one passed."""
        now_ms = self._queue._clock_ms()
        with self._lock:
            passed = bool(self._dues) and self._dues[0] <= now_ms
            while self._dues and self._dues[0] <= now_ms:
                if heapq.heappop(self._dues) == self._looked:
                    self._look_for_due = True
            if passed:
                return 0.0
            look = self._look_for_due
        if look:
            doc = self._queue._jobs.find_one(
                {"state": JOB_STATE_ENQUEUED, "task": {"$in": list(self._queue._tasks)},
                 "due": {"$gt": _time(now_ms)}},
                projection={"due": True}, sort=[("due", 1)])
            with self._lock:
                self._look_for_due, self._looked = False, None
                if doc is not None:
                    self._looked = round(doc["due"].timestamp() * 1000)
                    heapq.heappush(self._dues, self._looked)
        with self._lock:
            return (self._dues[0] - now_ms) / 1000 if self._dues else math.inf

    def close(self) -> None:
        self._closed.set()

    def _read(self) -> None:
        pause, said = OUTAGE_PAUSES[0], False  # said: the warning for this outage was logged
        while not self._closed.is_set():
            try:
                with self._queue._jobs.watch(_MONGO_EVENTS, max_await_time_ms=1000) as stream:
                    self._opened(True)
                    pause, said = OUTAGE_PAUSES[0], False
                    while stream.alive and not self._closed.is_set():
                        change = stream.try_next()
                        if change is not None:
                            self._dispatch(change)
            except self._queue._closed_client:  # closed by its owner: no stream to read again
                self._opened(False)
                return
            except Exception as exc:  # anything that closed it: the waits poll meanwhile
                refused = getattr(exc, "code", None) in _STREAMS_REFUSED
                if not (said or self._closed.is_set()):
                    logger.warning("MongoDB at %s %s (%s): idle workers and enqueue_wait poll every %.3g s%s",
                                   self._queue._address, "refused a change stream" if refused else
                                   "closed the change stream", _describe(exc), self._queue.poll_interval,
                                   "" if refused else " until it reopens")
                    said = True
                if refused:
                    self._opened(False)
                    return
            self._opened(False)
            self._closed.wait(pause)
            pause = min(pause * 2, OUTAGE_PAUSES[1])

    def _opened(self, live: bool) -> None:
        """Mark the stream open or closed and wake everyone to read again."""
        with self._lock:
            self._live = live
            self._look_for_due, self._announced = True, math.inf
            wakes = [wake for job_wakes in self._waiters.values() for wake in job_wakes]
        self._queue._wakeup.set()
        _wake(wakes)

    def _dispatch(self, change: dict[str, Any]) -> None:
        fields = change.get("fullDocument") or change.get("updateDescription", {}).get("updatedFields", {})
        if fields.get("cancel"):  # a running job was cancelled: its worker's heartbeat runs now
            self._queue._cancel_pushed.set()
            return
        task = fields.get("task")  # an insert names its task, an update not
        if change["operationType"] == "delete" or fields.get("state") in _MONGO_DONE:
            with self._lock:
                wakes = list(self._waiters.get(str(change["documentKey"]["_id"]), ()))
            _wake(wakes)
        elif self._queue._tasks and (task is None or task in self._queue._tasks):  # a worker's
            due, now_ms = fields.get("due"), self._queue._clock_ms()
            due_ms = now_ms if due is None else round(due.timestamp() * 1000)
            if due_ms > now_ms:
                with self._lock:
                    heapq.heappush(self._dues, due_ms)
            if due_ms - now_ms < IDLE_WAKE_INTERVAL * 1000:  # else the worker's wait ends before it is due
                self.announce(1)
                self._queue._wakeup.set()


def _wake(wakes: list[Callable[[], object]]) -> None:
    """Call waiters' wake-ups; one that fails (its event loop closed) is theirs to miss."""
    for wake in wakes:
        with contextlib.suppress(Exception):
            wake()


def _mongo_query(state: str | None, task_name: str | None) -> dict[str, Any]:
    """The filter of the jobs in ``state`` (as list_jobs reads it: done includes failed), of
    one task or all; by_task or by_state serves it, in _id order."""
    query: dict[str, Any] = {} if state is None else {"state": {"$in": _MONGO_DONE} if state == JOB_STATE_DONE
                                                                else state}
    if task_name is not None:
        query["task"] = task_name
    return query


def _mongo_outcome(doc: dict[str, Any]) -> str:
    """How a done job ended, as stored (a record from before outcomes were: by its error), as
    the Redis scripts' outcome_of reads it."""
    return doc.get("outcome") or ("failed" if doc.get("error") is not None else "succeeded")


def _set_if(field: str, value: Any) -> dict[str, Any]:
    return {} if value is None else {field: value}


def _mongo_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """Turn a job document into Queue._decode's fields: BSON dates become milliseconds. What
    is wrong with a document is left for _decode to say."""
    fields = {key: round(value.timestamp() * 1000) if isinstance(value, datetime) else value
              for key, value in doc.items() if value is not None}
    if fields.get("state") == "failed":
        fields["state"] = JOB_STATE_DONE
    due, enqueued = fields.get("due"), fields.get("enqueued")
    if isinstance(due, int) and isinstance(enqueued, int) and due <= enqueued:
        del fields["due"]  # every document has a due time; only a later one is a schedule
    return fields


# ---------------------------------------------------------------------------
# Web dashboard: python -m monsterqueue web URL
# ---------------------------------------------------------------------------

# One threaded HTTP server: pages for people, and a JSON API in the shapes of
# the command line's --json output. Pages: / (counts, workers, throughput),
# /jobs?state=&task=&offset=&limit= (newest first), /jobs/ID, and the forms
# POST /jobs/ID/retry and /jobs/ID/delete. API: GET /api/jobs (same query;
# {"jobs": [Job.as_dict()...], "offset": n, "limit": n}), /api/jobs/ID
# (Job.as_dict()), /api/stats (Queue.stats()); POST /api/jobs/ID/retry and
# /api/jobs/ID/delete. A POST carries the CSRF token in its form or in an
# X-CSRF-Token header; every answer to a request let in carries the token in
# that header: a page of another site can make a browser POST, but can't read
# the token from any answer.

WEB_REFRESH_INTERVAL = 5.0   # seconds between reloads of a page, skipped while a filter has focus
WEB_PAGE_SIZE = 50           # jobs on a page of the list, and the API's default limit
WEB_MAX_PAGE_SIZE = 1000     # the largest limit a page or API call may ask for

_WEB_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; } main { padding: 4px 16px 24px; }
header { background: #263238; color: #eceff1; padding: 8px 16px; display: flex; gap: 18px; }
header a { color: #fff; } header span { margin-left: auto; opacity: .7; } h1 { font-size: 20px; }
h2 { font-size: 16px; margin-top: 24px; } table { border-collapse: collapse; } th { text-align: left; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e0e0e0; vertical-align: top; } th { color: #555; }
td.n { text-align: right; } td.n a { text-decoration: none; } td.zero { color: #bbb; }
td.t { white-space: nowrap; } td.wrap { max-width: 34em; overflow-wrap: anywhere; }
pre { background: #f5f5f5; padding: 8px; overflow: auto; max-height: 30em; white-space: pre-wrap; }
.state { padding: 1px 7px; border-radius: 9px; color: #fff; background: #546e7a; font-size: 12px; }
.running { background: #ef6c00; } .done { background: #2e7d32; } .failed, .error { color: #c62828; }
.state.failed { background: #c62828; color: #fff; } form { display: inline; margin-right: 8px; }
.pager a { margin-right: 16px; } svg { vertical-align: middle; background: #f1f8e9; }
polyline { fill: none; stroke: #2e7d32; stroke-width: 2; } progress { width: 8em; vertical-align: middle; }
"""

# Asks before a delete, and reloads the page (same URL, so same filters) now
# and then, unless the person is typing in a filter or the tab is hidden.
_WEB_SCRIPT = """
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!confirm(form.dataset.confirm)) event.preventDefault();
  });
}
const refresh = Number(document.body.dataset.refresh);
if (refresh) {
  setInterval(() => {
    if (!document.hidden && !document.querySelector("input:focus, select:focus")) location.reload();
  }, refresh * 1000);
}
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only the page's own style and script run: were escaping ever missed, an
# injected script or handler would still be refused by the browser.
_WEB_CSP = (f"default-src 'none'; style-src {_csp_hash(_WEB_STYLE)}; script-src {_csp_hash(_WEB_SCRIPT)}; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class _WebError(Exception):
    """An answer other than 200: its HTTP status, and the message shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_loopback(host: str) -> bool:
    """Whether ``host``, a name or an address, is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _web_query(query: str) -> tuple[str | None, str | None, int, int]:
    """Read state, task, offset and limit from the query string of a job list."""
    values = dict(parse_qsl(query))
    try:
        offset, limit = int(values.get("offset") or 0), int(values.get("limit") or WEB_PAGE_SIZE)
    except ValueError:
        raise _WebError(400, "offset and limit must be whole numbers") from None
    if not 0 <= offset < 2**63 or not 1 <= limit <= WEB_MAX_PAGE_SIZE:
        raise _WebError(400, f"offset must be from 0 to 2**63 - 1, and limit from 1 to {WEB_MAX_PAGE_SIZE}")
    state = values.get("state") or None
    if state is not None and state not in _COUNTED_STATES:
        raise _WebError(400, f"state must be one of {', '.join(_COUNTED_STATES)}")
    return state, values.get("task") or None, offset, limit


def _escape(text: str) -> str:
    """Text as HTML. The html module is imported here, by a dashboard alone: it costs a
    producer's or a worker's memory 0.4 MB (argparse, which the command line imports, 0.3)."""
    import html

    return html.escape(text)


def _web_link(path: str, **query: Any) -> str:
    """A URL of this site with the query values that are set, escaped for an attribute."""
    values = urlencode({name: value for name, value in query.items() if value})
    return _escape(f"{path}?{values}" if values else path)


def _web_state(job: dict[str, Any]) -> str:
    kind = "failed" if _failed(job) else job["state"]
    return f'<span class="state {kind}">{_escape(_state_text(job))}</span>'


def _web_time(iso: str | None) -> str:
    """An ISO time to the second, UTC as every time here."""
    return _escape(iso[:19].replace("T", " ")) if iso else ""


def _web_short(value: Any, size: int = 90) -> str:
    """Escape a string, or a value as JSON, cut to ``size`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _escape(text if len(text) <= size else text[:size - 1] + "…")


def _web_json(value: Any) -> str:
    return _escape(json.dumps(value, indent=2, ensure_ascii=False))


def _web_sparkline(values: list[int], width: int = 240, height: int = 40) -> str:
    """Draw ``values`` as a line in an inline SVG, scaled to the largest."""
    top = max(values, default=0) or 1
    step = width / max(len(values) - 1, 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - value / top * (height - 4):.1f}"
                      for i, value in enumerate(values))
    return (f'<svg width="{width}" height="{height}" role="img"><title>jobs done per minute, oldest '
            f'first: {", ".join(map(str, values))}</title><polyline points="{points}"/></svg>')


def _web_count(count: int, task_name: str, state: str) -> str:
    """A cell of the overview's counts: a link to those jobs, or a quiet 0."""
    if not count:
        return '<td class="n zero">0</td>'
    return f'<td class="n"><a href="{_web_link("/jobs", task=task_name, state=state)}">{int(count)}</a></td>'


def _web_form(path: str, label: str, csrf_token: str, confirm: str | None = None, **fields: str) -> str:
    """A button that POSTs to ``path`` with the CSRF token, asking first if ``confirm`` is given."""
    inputs = "".join(f'<input type="hidden" name="{name}" value="{_escape(value)}">'
                     for name, value in {"csrf": csrf_token, **fields}.items())
    ask = f' data-confirm="{_escape(confirm)}"' if confirm else ""
    return f'<form method="post" action="{_escape(path)}"{ask}>{inputs}<button>{label}</button></form>'


def _web_task_actions(task_name: str, of_task: dict[str, int], csrf_token: str) -> str:
    path = f"/tasks/{quote(task_name, safe='')}"
    actions = []
    if of_task.get("failed"):
        actions.append(_web_form(f"{path}/retry", "Retry failed", csrf_token,
                                 f"Run the {of_task['failed']} failed jobs of {task_name} again?"))
    finished = of_task.get(JOB_STATE_DONE, 0) + of_task.get("failed", 0)
    if finished:
        actions.append(_web_form(f"{path}/delete", "Delete done", csrf_token,
                                 f"Delete the {finished} done jobs of {task_name}, failed ones too?",
                                 state=JOB_STATE_DONE))
    return "".join(actions)


def _web_progress(progress: Any) -> str:
    """A bar for a progress that is a percentage or a {"done": n, "total": n}; else its JSON."""
    if isinstance(progress, dict) and {"done", "total"} <= progress.keys():
        done, total = progress["done"], progress["total"]
    else:
        done, total = progress, 100
    numbers = all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in (done, total))
    if not numbers or total <= 0:
        return _web_short(progress, 40)
    text = f"{done:g}%" if total == 100 and not isinstance(progress, dict) else f"{done:g}/{total:g}"
    return f'<progress max="{total:g}" value="{min(max(done, 0), total):g}"></progress> {_escape(text)}'


def _web_overview(stats: dict[str, Any], csrf_token: str) -> str:
    counts: dict[str, dict[str, int]] = stats["counts"]
    rows = [f'<tr><td><a href="{_web_link("/jobs", task=task_name)}">{_escape(task_name)}</a>'
            + (' <span class="error" title="no live worker runs this task">no worker</span>'
               if task_name in stats["unserved"] else "") + "</td>"
            + "".join(_web_count(of_task.get(state, 0), task_name, state) for state in _COUNTED_STATES)
            + f"<td>{_web_task_actions(task_name, of_task, csrf_token)}</td></tr>"
            for task_name, of_task in counts.items()]
    rows.append("<tr><td><b>all tasks</b></td>"
                + "".join(_web_count(sum(of_task.get(state, 0) for of_task in counts.values()), "", state)
                          for state in _COUNTED_STATES) + "<td></td></tr>")
    timings = "".join(
        f"<tr><td>{_escape(task_name)}</td><td class=\"n\">{m['finished']}</td>"
        f"<td class=\"n\">{m['failed']}</td>"
        + "".join(f'<td class="n">{timing}</td>' for timing in _timings(m)) + "</tr>"
        for task_name, m in stats["metrics"].items())
    workers = "".join(f"<tr><td>{_escape(worker['id'])}</td><td>{_web_time(worker['last_seen'])}</td>"
                      f"<td>{_escape(', '.join(worker['tasks']))}</td></tr>"
                      for worker in stats["workers"])
    periodic = "".join(
        f"<tr><td>{_escape(p['name'])}</td><td>{_escape(p['task'])}</td>"
        f"<td>{_escape(p['schedule'])}</td><td class=\"t\">{_web_time(p['next'])}</td>"
        f"<td class=\"t\">{_web_time(p['last'])}</td><td>"
        + (f'<a href="/jobs/{quote(p["last_job"], safe="")}">{_escape(p["last_job"])}</a>'
           if p["last_job"] else "") + "</td></tr>" for p in stats["periodic"])
    done = stats["done_per_minute"]
    return ("<h2>Jobs</h2><table><tr><th>task</th>"
            + "".join(f"<th>{state}</th>" for state in _COUNTED_STATES)
            + f"<th></th></tr>{''.join(rows)}</table>"
            + ("<h2>Run time and queue wait</h2><table><tr><th>task</th><th>finished</th><th>failed</th>"
               "<th>run p50</th><th>p95</th><th>p99</th><th>wait p50</th><th>p95</th><th>p99</th></tr>"
               f"{timings}</table>" if timings else "")
            + ("<h2>Periodic jobs</h2><table><tr><th>schedule</th><th>task</th><th>when</th><th>next</th>"
               f"<th>last</th><th>last job</th></tr>{periodic}</table>" if periodic else "")
            + f"<h2>Done per minute</h2><p>{_web_sparkline(done)} {sum(done)} in the last {len(done)} "
            f"minutes, {done[-1] if done else 0} in this one</p>"
            f"<h2>Workers alive: {len(stats['workers'])}</h2>"
            + (f"<table><tr><th>worker</th><th>last seen</th><th>tasks</th></tr>{workers}</table>"
               if workers else "<p>No worker has been seen lately.</p>")
            + ("<h2>Malformed data</h2><ul>" + "".join(f"<li>{_escape(note)}</li>"
                                                       for note in stats["malformed"]) + "</ul>"
               if stats["malformed"] else ""))


def _web_job_list(jobs: list[dict[str, Any]], more: bool, state: str | None, task: str | None,
                  offset: int, limit: int) -> str:
    options = "".join(f'<option value="{value}"{" selected" if value == (state or "") else ""}>'
                      f"{value or 'any state'}</option>" for value in ("", *_COUNTED_STATES))
    rows = "".join(
        f'<tr><td><a href="/jobs/{quote(job["id"], safe="")}">{_escape(job["id"])}</a></td>'
        f'<td>{_escape(job["task"])}</td><td>{_web_state(job)}'
        f'{" " + _web_progress(job["progress"]) if job["progress"] is not None else ""}</td>'
        f'<td class="n">{int(job["attempt"])}</td>'
        f'<td class="t">{_web_time(job["enqueued"])}</td>'
        f'<td class="t">{_web_time(job["done"] or job["started"])}</td>'
        f'<td class="wrap">{_web_short(job["params"])}</td>'
        f'<td class="wrap error">{_web_short(job["error"]) if job["error"] is not None else ""}</td></tr>'
        for job in jobs)
    pages = ((offset - limit, "← newer", offset > 0), (offset + limit, "older →", more))
    pager = [f'<a href="{_web_link("/jobs", state=state, task=task, offset=to, limit=limit)}">{text}</a>'
             for to, text, shown in pages if shown]
    first = f"jobs {offset + 1} to {offset + len(jobs)}" if jobs else "no jobs"
    return (f'<form method="get" action="/jobs"><select name="state">{options}</select> '
            f'<input name="task" placeholder="task" value="{_escape(task or "")}"> '
            f"<button>Filter</button></form> {first}, newest first"
            "<table><tr><th>id</th><th>task</th><th>state</th><th>attempt</th><th>enqueued</th>"
            f"<th>started or done</th><th>params</th><th>error</th></tr>{rows}</table>"
            f'<p class="pager">{"".join(pager)}</p>')


def _web_job(job: dict[str, Any], dependents: list[str], csrf_token: str) -> str:
    path = f"/jobs/{quote(job['id'], safe='')}"
    done = job["state"] == JOB_STATE_DONE
    buttons = (_web_form(f"{path}/retry", "Retry", csrf_token) if done
               else _web_form(f"{path}/cancel", "Cancel", csrf_token, f"Cancel job {job['id']}?"))
    buttons += _web_form(f"{path}/delete", "Delete", csrf_token, f"Delete job {job['id']}?")
    times = "".join(f"<tr><th>{name}</th><td>{_escape(str(job[name] or ''))}</td></tr>"
                    for name in ("enqueued", "scheduled", "started", "done"))
    if job["progress"] is not None:
        times += f"<tr><th>progress</th><td>{_web_progress(job['progress'])}</td></tr>"
    for name, ids in (("depends on", job["dependency_ids"]), ("dependents", dependents)):
        if ids:
            links = ", ".join(f'<a href="/jobs/{quote(job_id, safe="")}">{_escape(job_id)}</a>'
                              for job_id in ids)
            times += f"<tr><th>{name}</th><td>{links}</td></tr>"
    if job["error"] is not None:
        outcome = f'<h2>Error</h2><pre class="error">{_escape(job["error"])}</pre>'
    elif done:
        outcome = f"<h2>Result</h2><pre>{_web_json(job['result'])}</pre>"
    else:
        outcome = ""
    if job["traceback"]:
        outcome += f'<h2>Traceback</h2><pre class="traceback">{_escape(job["traceback"])}</pre>'
    return (f"<p>{buttons}</p>"
            f"<table><tr><th>task</th><td>{_escape(job['task'])}</td></tr>"
            f"<tr><th>state</th><td>{_web_state(job)}</td></tr>"
            f"<tr><th>attempt</th><td>{int(job['attempt'])}</td></tr>{times}</table>"
            f"<h2>Params</h2><pre>{_web_json(job['params'])}</pre>{outcome}"
            f"<h2>Enqueued from</h2><pre>{_escape(job['stack'])}</pre>")


def _prometheus(stats: dict[str, Any]) -> str:
    """Render stats() in Prometheus' text format: gauges of jobs and workers, counters of jobs
    finished and failed, and histograms of run time and queue wait, per task."""
    def label(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    lines = ["# HELP monsterqueue_jobs Jobs stored, per task and state (failed apart from done).",
             "# TYPE monsterqueue_jobs gauge"]
    lines += [f'monsterqueue_jobs{{task="{label(task)}",state="{state}"}} {number}'
              for task, of_task in stats["counts"].items() for state, number in of_task.items()]
    lines += ["# HELP monsterqueue_task_unserved 1 for a task with jobs waiting that no live worker runs.",
              "# TYPE monsterqueue_task_unserved gauge"]
    lines += [f'monsterqueue_task_unserved{{task="{label(task)}"}} {int(task in stats["unserved"])}'
              for task in stats["counts"]]
    lines += ["# HELP monsterqueue_workers Workers whose heartbeat is less than three leases old.",
              "# TYPE monsterqueue_workers gauge", f"monsterqueue_workers {len(stats['workers'])}"]
    metrics = stats["metrics"]
    for kind, text in (("finished", "Jobs that ended, failed or not, ever."),
                       ("failed", "Jobs that failed, ever.")):
        name = f"monsterqueue_jobs_{kind}_total"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{task="{label(task)}"}} {m[kind]}' for task, m in metrics.items()]
    for kind, text in (("run", "Seconds from a run's start to its outcome."),
                       ("wait", "Seconds from enqueued (or due) to started.")):
        name = f"monsterqueue_job_{kind}_seconds"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        for task, m in metrics.items():
            histogram, task = m[f"{kind}_seconds"], label(task)
            lines += [f'{name}_bucket{{task="{task}",le="{bound}"}} {count}'
                      for bound, count in histogram["buckets"]]
            lines += [f'{name}_sum{{task="{task}"}} {histogram["sum"]}',
                      f'{name}_count{{task="{task}"}} {histogram["count"]}']
    return "\n".join(lines) + "\n"


# http.server costs producers and workers ~25 ms and ~1 MB to import: only a
# dashboard imports it, and mixes _WebHandler into its request handler then.
if TYPE_CHECKING:
    import argparse
    from http.server import BaseHTTPRequestHandler as _RequestHandler
    from http.server import ThreadingHTTPServer
else:
    _RequestHandler = object


class _WebHandler(_RequestHandler):
    """Answers one request to the dashboard; _serve_web gives it the queue and the secrets."""

    server_version = f"monsterqueue/{__version__}"

    def __init__(self, *args: Any, queue: Queue, credentials: bytes | None, csrf_token: str) -> None:
        self.queue = queue
        self.credentials = credentials    # b"USER:PASSWORD", or None for no auth
        self.csrf_token = csrf_token
        self.api = False                  # answer in JSON
        self.allowed = False              # passed the access check: may see the token
        super().__init__(*args)           # which handles the request

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("web: %s " + format, self.address_string(), *args)

    def _answer(self) -> None:
        url = urlsplit(self.path)
        # Split before unquoting, so that an id with a quoted "/" stays one part.
        parts = [unquote(part) for part in url.path.split("/") if part]
        self.api = parts[:1] == ["api"]
        route = parts[1:] if self.api else parts
        try:
            self._check_access()
            if self.command == "POST":
                self._post(route)
            else:
                self._get(route, url.query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away, as it does when a page reloads: no one to answer
        except _WebError as exc:
            self._error(exc.status, str(exc))
        except NoSuchJobError:
            self._error(404, "no such job")
        except MalformedJobError as exc:  # the record is wrong, not the request: said as it is
            self._error(422, str(exc))
        except ServerUnavailableError as exc:
            self._error(503, str(exc))
        except Exception:
            logger.exception("web: %s %s failed", self.command, self.path)
            self._error(500, "internal error: see the dashboard's log")

    do_GET = do_POST = _answer

    def _check_access(self) -> None:
        """Let in a request with the credentials or, without auth, one sent to a loopback name.

        The name check defeats DNS rebinding: a site whose name now points at
        127.0.0.1 still sends its own name in the Host header.
        """
        if self.credentials is None:
            try:
                host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
            except ValueError:
                host = ""
            if not _is_loopback(host):
                raise _WebError(403, "without --auth the dashboard answers only to a loopback name")
        else:
            scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
            try:
                given = base64.b64decode(encoded, validate=True)
            except ValueError:
                given = b""
            if scheme.lower() != "basic" or not hmac.compare_digest(given, self.credentials):
                raise _WebError(401, "this dashboard needs its user name and password")
        self.allowed = True

    def _get(self, route: list[str], query: str) -> None:
        if route == ["stats"] and self.api:
            self._send_json(self.queue.stats())
        elif route == [] and not self.api:
            self._send_page("Overview", _web_overview(self.queue.stats(), self.csrf_token))
        elif route == ["jobs"]:
            state, task, offset, limit = _web_query(query)
            # One more than a page, to know whether there is an older page.
            jobs = [job.as_dict() for job in self.queue.list_jobs(state, task, limit + 1, offset, True)]
            if self.api:
                self._send_json({"jobs": jobs[:limit], "offset": offset, "limit": limit})
            else:
                self._send_page("Jobs", _web_job_list(jobs[:limit], len(jobs) > limit, state, task,
                                                      offset, limit))
        elif len(route) == 2 and route[0] == "jobs":
            job = self.queue.retrieve_job(route[1]).as_dict()
            if self.api:
                self._send_json(job)
            else:
                self._send_page(f"Job {job['id']}", _web_job(job, self.queue._dependent_ids(job["id"]),
                                                             self.csrf_token))
        elif route == ["metrics"] and not self.api:
            self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                       _prometheus(self.queue.stats()).encode(), None)
        else:
            raise _WebError(404, "no such page")

    def _post(self, route: list[str]) -> None:
        if len(route) != 3 or (route[0], route[2]) not in (("jobs", "retry"), ("jobs", "delete"),
                                                          ("jobs", "cancel"), ("tasks", "retry"),
                                                          ("tasks", "delete")):
            raise _WebError(404, "no such action")
        # A form holds only the token and a state: read no more than that could take.
        body = self.rfile.read(min(_int(self.headers.get("Content-Length")), 4096))
        form = dict(parse_qsl(body.decode(errors="replace")))
        given = self.headers.get("X-CSRF-Token") or form.get("csrf", "")
        if not hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            raise _WebError(403, "missing or wrong CSRF token: reload the page and try again")
        kind, name, action = route
        where = f"/jobs/{quote(name, safe='')}"
        try:
            if kind == "tasks" and action == "retry":
                answer: dict[str, Any] = {"retried": self.queue.retry_jobs(name)}
                where = "/jobs?" + urlencode({"task": name, "state": JOB_STATE_ENQUEUED})
            elif kind == "tasks":
                answer = {"deleted": self.queue.delete_jobs(form.get("state", JOB_STATE_DONE), name)}
                where = "/"
            elif action == "delete":
                self.queue.delete_job(name)
                answer = {"deleted": name}
                where = "/jobs"
            else:
                act = self.queue.retry_job if action == "retry" else self.queue.cancel_job
                answer = act(name).as_dict()
        except ValueError as exc:
            raise _WebError(409, str(exc)) from None
        if self.api:
            self._send_json(answer)
        else:
            self._send(303, "text/plain", b"", {"Location": where})

    def _send_page(self, title: str, body: str, status: int = 200, headers: dict[str, str] | None = None,
                   refresh: bool = True) -> None:
        where = f"{type(self.queue).__name__} at {self.queue._address}"
        page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f"<title>{_escape(title)} · monsterqueue</title><style>{_WEB_STYLE}</style></head>"
                f'<body data-refresh="{WEB_REFRESH_INTERVAL if refresh else 0:g}"><header><b>monsterqueue</b>'
                f'<a href="/">Overview</a><a href="/jobs">Jobs</a><span>{_escape(where)}, times in UTC'
                f"</span></header><main><h1>{_escape(title)}</h1>{body}</main>"
                f"<script>{_WEB_SCRIPT}</script></body></html>")
        self._send(status, "text/html; charset=utf-8", page.encode(), headers)

    def _send_json(self, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(value).encode(), headers)

    def _error(self, status: int, message: str) -> None:
        # A 401 asks the browser for the user name and password.
        headers = {"WWW-Authenticate": 'Basic realm="monsterqueue", charset="UTF-8"'} if status == 401 else {}
        if self.api:
            self._send_json({"error": message}, status, headers)
        else:
            # Not reloaded: it may answer a POST, which a reload would send again.
            self._send_page(f"{status} {self.responses[status][0]}",
                            f'<p class="error">{_escape(message)}</p>', status, headers, refresh=False)

    def _send(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                            "Content-Security-Policy": _WEB_CSP, **(headers or {})}.items():
            self.send_header(name, value)
        if self.allowed:
            self.send_header("X-CSRF-Token", self.csrf_token)
        self.end_headers()
        self.wfile.write(body)


def _serve_web(queue: Queue, host: str, port: int, auth: str | None) -> ThreadingHTTPServer:
    """Bind the dashboard of ``queue`` to host:port and return its server, not yet serving.

    The caller runs serve_forever() (on a thread, in tests) and ends it with
    shutdown() and server_close(); port 0 takes a free port, which
    server_port tells. ``auth`` is USER:PASSWORD for HTTP basic auth,
    required on any host but a loopback one: ValueError otherwise. Each
    server draws its own CSRF token.
    """
    if auth is not None and ":" not in auth:
        raise ValueError("--auth must be USER:PASSWORD")
    if auth is None and not _is_loopback(host):
        raise ValueError(f"refusing to serve the dashboard on {host} without --auth USER:PASSWORD "
                         "(or MONSTERQUEUE_WEB_AUTH): only a loopback host may go without")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(type("WebHandler", (_WebHandler, BaseHTTPRequestHandler), {}), queue=queue,
                                credentials=None if auth is None else auth.encode(),
                                csrf_token=secrets.token_urlsafe(32))
    # On IPv6 when the host is an IPv6 address or name.
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return type("WebServer", (ThreadingHTTPServer,), {"address_family": family})((host, port), handler)


def _web(queue: Queue, host: str, port: int, auth: str | None) -> int:
    """Serve the dashboard of a queue until SIGINT; return 2 if the host or port is refused."""
    auth = auth or os.environ.get("MONSTERQUEUE_WEB_AUTH") or None
    try:
        server = _serve_web(queue, host, port, auth)
    except (ValueError, OSError) as exc:
        print(f"monsterqueue: {exc}", file=sys.stderr)
        return 2
    logger.info("dashboard of %s on http://%s:%d/%s", queue._address, f"[{host}]" if ":" in host else host,
                   server.server_port, " with basic auth" if auth else "")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()
    queue.close()
    return 0


# ---------------------------------------------------------------------------
# Command line: python -m monsterqueue [demo | worker | web | jobs | show | stats | enqueue | retry | delete]
# ---------------------------------------------------------------------------

def _open(url: str, prefix: str | None, shards: int = 1, cluster: bool = False, **options: Any) -> Queue:
    """Build the queue a command names, under the key or collection prefix given, and for
    Redis over that many shards, through a cluster client if asked."""
    backend = _backend_for(url)
    if prefix:
        options.update({RedisQueue: {"key_prefix": prefix}, MongoQueue: {"collection_prefix": prefix}}.get(
            backend, {}))
    if (shards != 1 or cluster) and backend is not RedisQueue:
        raise ValueError("--shards and --cluster are for a Redis URL")
    if backend is RedisQueue:
        options["shards"] = shards
    if cluster:
        redis = _require("redis", "redis")
        try:  # the client reads the cluster's slots at once
            client = redis.cluster.RedisCluster.from_url(url, decode_responses=True,
                                                         encoding_errors="surrogateescape")
        except redis.RedisError as exc:
            raise ServerUnavailableError(f"can't reach the Redis Cluster at {url}: {exc}") from None
        queue: Queue = RedisQueue(client=client, **options)
    else:
        queue = backend(url, **options)
    if isinstance(queue, RedisQueue):  # a --shards its ids don't fit is a usage error, said at once
        with contextlib.suppress(ServerUnavailableError), queue._server:  # else said when it's back
            queue._check_shards(record=False)
    return queue


def _demo(url: str, jobs: int, concurrency: int) -> None:
    """Enqueue and process ``jobs`` jobs on ``url``, showing progress, then time enqueue_wait."""
    # Its own keys or collection, so that reset_storage can't touch the user's jobs.
    with _open(url, "monsterqueue_demo", concurrency=concurrency) as queue:
        queue.reset_storage()

        @queue.task()
        def square(n: int) -> int:
            return n * n

        started = time.perf_counter()
        enqueued = queue.enqueue_many("square", ({"n": n} for n in range(jobs)))
        enqueue_seconds = time.perf_counter() - started
        print(f"enqueued {jobs} jobs on {url} in {enqueue_seconds:.2f}s "
              f"({jobs / enqueue_seconds:,.0f} jobs/s)")
        worker = threading.Thread(target=queue.process_loop, daemon=True)
        started = time.perf_counter()
        worker.start()
        last = enqueued[-1].id
        # A progress line redrawn in place, on a terminal only: a log file would get one long line.
        live = sys.stdout.isatty()
        while queue.retrieve_job(last).status.state != JOB_STATE_DONE:
            if live:
                done = queue.stats()["counts"].get("square", {}).get(JOB_STATE_DONE, 0)
                elapsed = time.perf_counter() - started
                print(f"\rprocessing: {done:>7} / {jobs} jobs, {elapsed:5.1f}s", end="", flush=True)
            time.sleep(0.1)
        queue.wait()  # the last job is done: the jobs before it are done or finishing
        elapsed = time.perf_counter() - started
        print(f"{chr(13) if live else ''}processed {jobs} jobs with {concurrency} threads in {elapsed:.2f}s "
              f"({jobs / elapsed:,.0f} jobs/s)")
        round_trips = []
        for n in range(21):
            started = time.perf_counter()
            queue.enqueue_wait("square", {"n": n}, timeout=10)
            round_trips.append((time.perf_counter() - started) * 1000)
        print(f"enqueue_wait round trip: {sorted(round_trips)[10]:.2f} ms (median of 21)")
        queue.stop()
        queue.reset_storage()


def _load_queue(spec: str) -> Queue:
    """Import MODULE:ATTRIBUTE and return the Queue it names."""
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    queue: Any = importlib.import_module(module_name)
    for name in (attribute or "queue").split("."):
        queue = getattr(queue, name)
    if not isinstance(queue, Queue):
        raise TypeError(f"it is a {type(queue).__name__}, not a monsterqueue.Queue")
    return queue


def _work(queue: Queue, grace: float) -> int:
    """Run queue.process_loop until SIGTERM or SIGINT; finish running jobs within ``grace`` seconds.

    A second signal, or the grace period running out, exits at once: the
    unfinished jobs keep their lease and are delivered again when it runs out.
    """
    signals = itertools.count(1)

    def give_up() -> None:
        logger.error("grace period over: exiting now; unfinished jobs will be redelivered")
        os._exit(1)

    def on_signal(signum: int, frame: Any) -> None:
        if next(signals) > 1:
            logger.warning("second signal: exiting now; unfinished jobs will be redelivered")
            os._exit(1)
        logger.warning("signal %d: finishing the running jobs (grace %gs)", signum, grace)
        queue.stop()
        timer = threading.Timer(grace, give_up)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("worker %d runs tasks %s with %d threads on %s", os.getpid(),
                ", ".join(queue._tasks) or "(none)", queue.concurrency, queue._address)
    queue.process_loop()
    queue.close()
    return 0


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[["" if cell is None else str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in cells)


def _outcome(data: dict[str, Any]) -> str:
    if data["error"] is not None:
        return f"error: {data['error']}"
    if data["state"] != JOB_STATE_DONE:
        return "" if data["progress"] is None else f"progress: {json.dumps(data['progress'])}"
    return f"result: {json.dumps(data['result'])}"


def _short(moment: str | None) -> str:
    return "" if moment is None else moment[:23].replace("T", " ")


def _inspect(args: argparse.Namespace) -> int:
    """Run one inspection command; print a table, or JSON with --json. Return the exit code."""
    queue = _open(args.url, args.prefix, args.shards, args.cluster)
    try:
        if args.command == "jobs":
            jobs = queue.list_jobs(args.state, args.task, args.limit, args.offset, newest_first=True)
            page = {"jobs": [job.as_dict() for job in jobs], "offset": args.offset, "limit": args.limit}
            print(json.dumps(page, indent=2) if args.json else _table(
                ["ID", "TASK", "STATE", "ENQUEUED", "DONE", "ATTEMPT", "OUTCOME"],
                [[d["id"], d["task"], _state_text(d), _short(d["enqueued"]), _short(d["done"]), d["attempt"],
                  _outcome(d)[:60]] for d in page["jobs"]]))
        elif args.command == "stats":
            stats = queue.stats()
            print(json.dumps(stats, indent=2) if args.json else "\n".join([
                _table(["TASK", *(state.upper() for state in _COUNTED_STATES)],
                       [[task, *counts.values()] for task, counts in stats["counts"].items()]),
                "\n" + _table(["TASK", "FINISHED", "FAILED", "RUN P50", "P95", "P99", "WAIT P50", "P95",
                               "P99"], [[task, m["finished"], m["failed"], *_timings(m)]
                                        for task, m in stats["metrics"].items()]),
                *(["\n" + _table(["SCHEDULE", "TASK", "WHEN", "NEXT", "LAST", "LAST JOB"],
                                 [[p["name"], p["task"], p["schedule"], _short(p["next"]), _short(p["last"]),
                                   p["last_job"]] for p in stats["periodic"]])] if stats["periodic"] else []),
                f"\nworkers alive: {len(stats['workers'])}",
                *(f"  {w['id']}  seen {_short(w['last_seen'])}  tasks {', '.join(w['tasks'])}"
                  for w in stats["workers"]),
                f"done per minute, last 15 minutes: {' '.join(map(str, stats['done_per_minute']))}",
                *([f"unserved (jobs waiting, no live worker runs the task): {', '.join(stats['unserved'])}"]
                  if stats["unserved"] else []),
                *(f"malformed: {note}" for note in stats["malformed"])]))
        elif args.command == "enqueue":
            params = json.loads(args.params)
            job = (queue.enqueue(args.task, params) if args.wait is None
                   else queue.enqueue_wait(args.task, params, timeout=args.wait))
            _show(job, args.json)
            if _failed(job.as_dict()):
                return 1
        elif args.command == "delete" and args.id is None:
            return _delete_jobs(queue, args)
        elif args.command == "delete":
            queue.delete_job(args.id)
            print(json.dumps({"deleted": args.id}) if args.json else f"deleted job {args.id}")
        elif args.command == "retry" and args.id is None:
            retried = queue.retry_jobs(args.task)
            print(json.dumps({"retried": retried}) if args.json else f"retried {retried} failed jobs")
        elif args.command == "cancel":
            job = queue.cancel_job(args.id)
            if job.status.state == JOB_STATE_RUNNING:
                print(f"monsterqueue: cancel requested: the worker running job {job.id} stops it within "
                      f"about a second", file=sys.stderr)
                deadline = time.monotonic() + (args.wait or 0)
                while job.status.state != JOB_STATE_DONE and time.monotonic() < deadline:
                    time.sleep(0.05)
                    job = queue.retrieve_job(job.id)
            _show(job, args.json)
        else:
            act = queue.retry_job if args.command == "retry" else queue.retrieve_job
            _show(act(args.id), args.json)
        return 0
    except QueueWaitTimeoutError as exc:
        print(f"monsterqueue: {exc}: job {exc.job.id if exc.job else '?'} stays enqueued", file=sys.stderr)
        return 1
    except (NoSuchJobError, MalformedJobError, ValueError, TypeError) as exc:  # a bad job, params or state
        print(f"monsterqueue: {exc}", file=sys.stderr)
        return 1
    finally:
        queue.close()


def _delete_jobs(queue: Queue, args: argparse.Namespace) -> int:
    """Delete the jobs of a state (and task) with --yes; without it, say how many it would."""
    counts = queue.stats()["counts"]
    states = (JOB_STATE_DONE, "failed") if args.state == JOB_STATE_DONE else (args.state,)
    matching = sum(of_task[state] for task, of_task in counts.items() for state in states
                   if args.task in (None, task))
    if not args.yes:
        print(f"monsterqueue: this deletes the {matching} {args.state} jobs of "
              f"{'task ' + args.task if args.task else 'every task'}: add --yes to do it", file=sys.stderr)
        return 2
    deleted = queue.delete_jobs(args.state, args.task)
    print(json.dumps({"deleted": deleted}) if args.json else f"deleted {deleted} {args.state} jobs")
    return 0


def _show(job: Job, as_json: bool) -> None:
    data = job.as_dict()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for name in ("id", "task", "state", "enqueued", "scheduled", "started", "done", "attempt"):
        if data[name] is not None:
            print(f"{name + ':':11}{_state_text(data) if name == 'state' else data[name]}")
    print(f"{'params:':11}{json.dumps(data['params'])}")
    dependents = job.queue._dependent_ids(job.id)
    for name, ids in (("depends on", data["dependency_ids"]), ("dependents", dependents)):
        if ids:
            print(f"{name + ':':11}{' '.join(ids)}")
    if data["progress"] is not None:
        print(f"{'progress:':11}{json.dumps(data['progress'])}")
    if data["state"] == JOB_STATE_DONE:
        print(f"{'error:':11}{data['error']}" if data["error"] is not None
              else f"{'result:':11}{json.dumps(data['result'])}")
    if data["traceback"]:
        print(data["traceback"].rstrip())
    print("enqueued from:\n" + data["stack"].rstrip())


def main(argv: list[str] | None = None) -> int:
    """The command line: a demo by default, a worker, or a look at a queue.

    Exit codes: 0 done; 1 the job is unknown, not done, failed or timed out;
    2 a usage error; 3 the URL is wrong or its server can't be reached.
    """
    import argparse  # see _escape

    # The global options, taken before the command or after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        default=argparse.SUPPRESS,
                        help="what is logged (default: INFO for worker and web, which log each job and "
                             "request, WARNING for the rest)")
    parser = argparse.ArgumentParser(prog="python -m monsterqueue", parents=[common],
                                     description=__doc__.split("\n")[0] + " With no command: the demo.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", parents=[common], help="enqueue and run jobs, then time enqueue_wait "
                               "(the command by default)")
    demo.add_argument("--url", default="memory://", help="queue URL (default memory://)")
    demo.add_argument("--jobs", type=int, default=5000, help="jobs it runs (default 5000)")
    demo.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                      help=f"worker threads (default {DEFAULT_CONCURRENCY})")
    worker = commands.add_parser("worker", parents=[common],
                                 help="run the tasks of a queue until SIGTERM or SIGINT")
    worker.add_argument("queue", metavar="MODULE:QUEUE", help="e.g. myapp.tasks:queue")
    worker.add_argument("--concurrency", type=int, dest="threads",
                        help="worker threads (default: the queue's)")
    worker.add_argument("--grace", type=float, default=60.0,
                        help="seconds running jobs get to finish after a signal (default 60)")

    def sharding(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--shards", type=int, default=1, help="the queue's shards (Redis; default 1)")
        sub.add_argument("--cluster", action="store_true", help="the URL names a node of a Redis Cluster")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help)
        sub.add_argument("url", metavar="URL", help="the queue's URL, e.g. redis://localhost:6379/0")
        sub.add_argument("--prefix", help="the queue's key_prefix (Redis) or collection_prefix (MongoDB)")
        sharding(sub)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub
    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument("--state", choices=[*_COUNTED_STATES])
    jobs.add_argument("--task", help="only the jobs of this task")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs.add_argument("--offset", type=int, default=0, help="skip this many first")
    command("show", "one job: params, times, attempts, outcome, enqueue stack").add_argument("id")
    command("stats", "counts per task and state, workers alive")
    enqueue = command("enqueue", "enqueue a job")
    enqueue.add_argument("task")
    enqueue.add_argument("params", nargs="?", default="{}", help="JSON object (default {})")
    enqueue.add_argument("--wait", type=float, metavar="SECONDS", help="wait for its outcome")
    retry = command("retry", "run a done job again, or with --failed every failed job (of --task)")
    retry.add_argument("id", nargs="?")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.add_argument("--task", help="with --failed: only the failed jobs of this task")
    delete = command("delete", "delete a job, or with --state every job in that state (of --task)")
    delete.add_argument("id", nargs="?")
    delete.add_argument("--state", choices=[JOB_STATE_ENQUEUED, JOB_STATE_DONE, "failed"],
                        help="every job in this state (done includes the failed ones)")
    delete.add_argument("--task", help="with --state: only the jobs of this task")
    delete.add_argument("--yes", action="store_true", help="with --state: really delete them")
    cancel = command("cancel", "cancel a job: it never runs, or is interrupted if running")
    cancel.add_argument("id")
    cancel.add_argument("--wait", type=float, metavar="SECONDS", help="wait for a running job to end")
    web = commands.add_parser("web", parents=[common],
                              help="serve the dashboard and its JSON API until SIGINT, logging each request")
    web.add_argument("url", metavar="URL", help="the queue's URL, e.g. redis://localhost:6379/0")
    web.add_argument("--prefix", help="the queue's key_prefix (Redis) or collection_prefix (MongoDB)")
    sharding(web)
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=8778, help="port to listen on (default 8778)")
    web.add_argument("--auth", metavar="USER:PASSWORD", help="require HTTP basic auth, as any host but a "
                     "loopback one does (default: $MONSTERQUEUE_WEB_AUTH)")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "demo"])
    bulk = {"retry": "failed", "delete": "state"}.get(args.command)
    if bulk and (args.id is None) == (not getattr(args, bulk)):
        parser.error(f"{args.command} takes a job id or --{bulk}, one of them")
    level = getattr(args, "log_level", None) or ("INFO" if args.command in ("worker", "web") else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "web":
            queue = _open(args.url, args.prefix, args.shards, args.cluster)
            return _web(queue, args.host, args.port, args.auth)
        if args.command == "worker":
            try:
                queue = _load_queue(args.queue)
            except (ImportError, AttributeError, TypeError) as exc:
                print(f"monsterqueue: can't load {args.queue}: {exc}", file=sys.stderr)
                return 2
            if args.threads:
                queue.concurrency = args.threads
            return _work(queue, args.grace)
        if args.command == "demo":
            _demo(args.url, args.jobs, args.concurrency)
            return 0
        return _inspect(args)
    except (ServerUnavailableError, ImportError) as exc:
        print(f"monsterqueue: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:  # a URL no backend takes
        print(f"monsterqueue: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # its reader went away (| head): say nothing more, as head expects
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    # The user's module imports monsterqueue: let it find this very module, not a second copy.
    sys.modules.setdefault("monsterqueue", sys.modules[__name__])
    sys.exit(main())

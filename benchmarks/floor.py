"""What one enqueue costs the Redis server at least: its CPU per call, one call at a time.

    python benchmarks/floor.py [--redis-url URL] [--calls N] [--rounds N]

One producer makes N calls of each kind on a flushed DB, the kinds in turn
(their order reversed every other round); the table shows medians over the
rounds of the server's CPU (INFO cpu, user + sys) and the wall time per call:

- LPUSH of a 200-byte message: Huey's whole enqueue, one round trip, one write.
- flat script: the writes of monsterqueue's enqueue for one job (its number,
  hash, three listing indexes, task queue, count and ready mark), in one script
  with no helper functions and no arguments to parse: what the enqueue would
  cost the server if all its Lua but the writes cost nothing.
- Queue.enqueue: monsterqueue's own, script and client.
"""

import argparse
import os
import statistics
import sys
import time

import redis

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monsterqueue

FLAT = """
local t = redis.call('TIME')
local id = tostring(redis.call('INCRBY', KEYS[1], 1))
local now = t[1] .. string.sub(t[2], 1, 3)
redis.call('HSET', 'q:job:' .. id, 'task', 'noop', 'params', ARGV[1], 'state', 'enqueued',
           'enqueued', now, 'stack', ARGV[2], 'delivery', '0', 'attempt', '1')
redis.call('ZADD', 'q:jobs', id, id)
redis.call('ZADD', 'q:task:noop', id, id)
redis.call('ZADD', 'q:enqueued', id, id)
redis.call('ZADD', 'q:queue:noop', id, id)
redis.call('HINCRBY', 'q:counts', 'enqueued:noop', 1)
redis.call('ZADD', 'q:ready:noop', '0', '1')
return {now, id}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        sys.exit("refusing to FLUSHDB db 0: give a --redis-url with a db of its own")
    queue = monsterqueue.Queue(args.redis_url)
    stack = monsterqueue._enqueue_stack()  # as long as the one Queue.enqueue stores from here
    flat = client.script_load(FLAT)
    kinds = {
        "LPUSH, 200 bytes (Huey's enqueue)": lambda i: client.lpush("q:list", b"x" * 200),
        "flat script of the enqueue's writes": lambda i: client.evalsha(flat, 1, "q:seq", '{"i": %d}' % i, stack),
        "Queue.enqueue": lambda i: queue.enqueue("noop", {"i": i}),
    }
    measured: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        for kind in list(kinds)[::1 if round_ % 2 == 0 else -1]:
            client.flushdb()
            cpu, started = server_cpu(client), time.perf_counter()
            for i in range(args.calls):
                kinds[kind](i)
            wall, cpu = time.perf_counter() - started, server_cpu(client) - cpu
            measured[kind].append((cpu / args.calls * 1e6, wall / args.calls * 1e6))
    client.flushdb()
    version = client.info("server")["redis_version"]
    print(f"{args.calls} calls a round, medians of {args.rounds} rounds; Redis {version}, {os.cpu_count()} CPUs\n")
    print("| call | server CPU µs/call | wall µs/call |\n|---|--:|--:|")
    for kind, values in measured.items():
        print(f"| {kind} | {statistics.median(v[0] for v in values):.1f} | "
              f"{statistics.median(v[1] for v in values):.1f} |")


def server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


if __name__ == "__main__":
    main()

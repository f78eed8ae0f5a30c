"""The Redis CPU a job costs on each master of a Redis Cluster, with a queue on one
shard and spread over all of them, and the capacity that makes.

    python benchmarks/shards.py [--server redis-server] [--masters 3] [--jobs 30000]

Starts a throwaway cluster of --masters masters (equal slot ranges, as
`redis-cli --cluster create` splits them) from the --server binary on free
loopback ports. For shards=1 and shards=masters, in turn: enqueues --jobs no-op
jobs (enqueue_many, 100 a call), processes them with one worker of 8 threads,
and reads each master's INFO cpu (user + sys) and INFO commandstats before and
after. A queue's jobs/s are bounded by its busiest master: one core carries
1e6 / (that master's CPU us per job) jobs a second. The projection assumes the
workers and producers are not the bottleneck (here they share 2 cores with the
masters, so the measured jobs/s are not the capacity) and an even spread, which
the share columns show.
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import redis
from redis.cluster import RedisCluster

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monsterqueue


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster(binary, masters):
    ports = [free_port() for _ in range(masters)]
    workdir = tempfile.mkdtemp(prefix="mq-shards-bench-")
    procs = [subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                               "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                               "--cluster-port", str(free_port()), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    nodes = [redis.Redis(port=port, host="127.0.0.1") for port in ports]
    for node in nodes:
        for _ in range(100):
            try:
                node.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
    size = 16384 / masters
    for i, node in enumerate(nodes):
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", round(i * size), round((i + 1) * size) - 1)
    bus = int(nodes[0].config_get("cluster-port")["cluster-port"])
    for node in nodes[1:]:
        node.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0], bus)
    deadline = time.monotonic() + 30
    while not all(node.cluster("info")["cluster_state"] == "ok" for node in nodes):
        if time.monotonic() > deadline:
            sys.exit("the cluster did not form")
        time.sleep(0.1)
    time.sleep(1)  # every node agrees on the slots

    def stop():
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return ports, nodes, stop


def usage(nodes):
    """Each master's CPU seconds and command calls."""
    out = []
    for node in nodes:
        cpu = node.info("cpu")
        calls = sum(stat["calls"] for stat in node.info("commandstats").values())
        out.append((cpu["used_cpu_user"] + cpu["used_cpu_sys"], calls))
    return out


def run(port, nodes, shards, jobs):
    client = RedisCluster(host="127.0.0.1", port=port, decode_responses=True)
    queue = monsterqueue.RedisQueue(client=client, key_prefix=f"bench-shards-{shards}", shards=shards)
    queue.reset_storage()
    done = threading.Semaphore(0)
    queue.task("noop")(lambda i: done.release() or i)
    worker = threading.Thread(target=queue.process_loop, daemon=True)
    before = usage(nodes)
    started = time.perf_counter()
    for start in range(0, jobs, 100):
        queue.enqueue_many("noop", [{"i": i} for i in range(start, min(start + 100, jobs))])
    worker.start()
    for _ in range(jobs):
        done.acquire()
    queue.wait()
    seconds = time.perf_counter() - started
    queue.stop()
    after = usage(nodes)
    assert queue.stats()["counts"]["noop"]["done"] == jobs
    queue.reset_storage()
    queue.close()
    client.close()
    cpu = [(a[0] - b[0]) / jobs * 1e6 for a, b in zip(after, before)]
    calls = [a[1] - b[1] for a, b in zip(after, before)]
    return cpu, [100 * c / sum(calls) for c in calls], jobs / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="redis-server", help="the redis-server or valkey-server binary")
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    binary = shutil.which(args.server) or sys.exit(f"no {args.server} on PATH")
    ports, nodes, stop = start_cluster(binary, args.masters)
    version = nodes[0].info("server").get("redis_version")
    try:
        rows = {}
        for _ in range(args.repeats):
            for shards in (1, args.masters):
                rows.setdefault(shards, []).append(run(ports[0], nodes, shards, args.jobs))
    finally:
        stop()
    print(f"\n{os.path.basename(binary)} {version}, {args.masters} masters, {args.jobs} jobs, "
          f"medians of {args.repeats}, {os.cpu_count()} CPUs\n")
    print("| shards | Redis CPU us/job, all masters | busiest master us/job "
          "| share of commands per master, % | jobs/s one core per master carries (projection) "
          "| measured jobs/s here |")
    print("|--:|--:|--:|---|--:|--:|")
    for shards, results in rows.items():
        per_master = [statistics.median(r[0][i] for r in results) for i in range(args.masters)]
        shares = [statistics.median(r[1][i] for r in results) for i in range(args.masters)]
        rate = statistics.median(r[2] for r in results)
        busiest = max(per_master)
        spread = " / ".join(f"{share:.1f}" for share in shares)
        print(f"| {shards} | {sum(per_master):.1f} | {busiest:.1f} | {spread} "
              f"| {1e6 / busiest:,.0f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()

"""Pieces shared by the peer adapters (peer_*.py)."""
import time


def task_result(i):
    """What every peer's no-op task returns: a small JSON-able result."""
    return {"ok": 1, "i": i}


class SyncClient:
    """Producer-side adapter. Subclasses implement enqueue(i), enqueue_wait(i),
    done(n) and close(); async peers override the two loops instead."""

    def enqueue_jobs(self, n):
        for i in range(n):  # one producer, one job per call
            self.enqueue(i)

    def wait_latencies(self, k, warmup=5):
        out = []
        for i in range(warmup + k):
            t = time.perf_counter()
            self.enqueue_wait(i)
            out.append(time.perf_counter() - t)
        return out[warmup:]

    def stragglers(self, n):
        """Jobs still unfinished after done(n) said yes (only for peers whose
        done() is a heuristic, see peer_monsterqueue)."""
        return 0

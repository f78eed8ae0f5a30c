"""Worker process for bench.py: `python worker.py PEER VARIANT URL THREADS`.

Imports and builds everything, prints "ready", then waits for a line on stdin
before it starts consuming, so the processing time bench.py measures excludes
interpreter start-up and imports. Runs until SIGTERM.
"""
import importlib
import logging
import sys

peer, variant, url, threads = sys.argv[1], sys.argv[2].strip("-"), sys.argv[3], int(sys.argv[4])
logging.basicConfig(level=logging.WARNING)  # no per-job log lines for anyone
run = importlib.import_module("peer_" + peer).worker(url, variant, threads)
print("ready", flush=True)
sys.stdin.readline()
run()

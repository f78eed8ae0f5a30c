"""Draw docs/dashboard.png: the dashboard's overview of a queue with some history, in headless Chromium.

    pip install -e ".[test]" && python docs/screenshot.py

Needs Debian's chromium and chromium-driver (as the browser test does). The
queue lives in this process (memory://): a few tasks run, fail, retry and
report progress, then the page is drawn at 1280x900.
"""

import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

import monsterqueue  # noqa: E402


def fill(queue: monsterqueue.Queue) -> None:
    """Jobs of four tasks in every state, with timings worth a histogram."""
    @queue.task()
    def resize(width: int) -> int:
        time.sleep(width / 20000)
        return width // 2

    @queue.task(max_retries=1, retry_delay=0.01)
    def charge(cents: int) -> str:
        if cents % 7 == 0:
            raise RuntimeError("card declined")
        return "paid"

    class Report(monsterqueue.Task):
        name = "report"

        def run(self, job: monsterqueue.Job) -> None:
            for page in range(1, 1000):
                job.set_progress({"done": page, "total": 1000})
                time.sleep(0.05)

    queue.register_task(Report())

    @queue.periodic("0 3 * * MON-FRI", name="nightly-cleanup")
    def cleanup() -> None: ...

    @queue.periodic(every=60.0)
    def sync_stock() -> None: ...

    queue.enqueue_many("resize", [{"width": 200 + 37 * i} for i in range(60)])
    queue.enqueue_many("charge", [{"cents": 100 + i} for i in range(40)])
    queue.enqueue("report", {"month": "2026-10"})
    worker = threading.Thread(target=queue.process_loop, daemon=True)
    worker.start()
    while queue.stats()["counts"]["resize"]["done"] < 60:
        time.sleep(0.1)
    time.sleep(1.5)  # the report's progress is stored
    queue.enqueue_many("mail", [{"to": f"user{i}@example.com"} for i in range(12)])  # no worker runs it


def main() -> None:
    queue = monsterqueue.MemoryQueue(concurrency=4)
    fill(queue)
    server = monsterqueue._serve_web(queue, "127.0.0.1", 0, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,1100",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        path = os.path.join(HERE, "dashboard.png")
        browser.save_screenshot(path)
        print(f"wrote {path}")
    finally:
        browser.quit()
        server.shutdown()
        queue.close()


if __name__ == "__main__":
    main()

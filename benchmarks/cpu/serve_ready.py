"""Seconds from `kvyard serve` to its "server ready" line, then the resident memory of its
processes (API, scheduler, multiprocessing's resource tracker), idle.

    python benchmarks/cpu/serve_ready.py [--port 31888] [extra kvyard serve flags...]
"""
from __future__ import annotations

import subprocess
import sys
import time


def main(argv: list[str]) -> None:
    port = argv[argv.index("--port") + 1] if "--port" in argv else "31888"
    extra = [a for i, a in enumerate(argv) if a != "--port" and (i == 0 or argv[i - 1] != "--port")]
    start = time.time()
    proc = subprocess.Popen(["kvyard", "serve", "--port", port, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "server ready" in line:
                print(f"ready after {time.time() - start:.2f} s")
                break
        else:
            sys.exit(f"kvyard serve exited ({proc.wait()}) before it was ready")
        time.sleep(1.0)
        total = 0
        for row in subprocess.run(["ps", "-eo", "ppid,pid,rss,args"], capture_output=True, text=True).stdout.splitlines()[1:]:
            ppid, pid, rss, args = row.split(None, 3)
            if int(pid) == proc.pid or int(ppid) == proc.pid:
                total += int(rss)
                print(f"  {int(rss) / 1024:.0f} MB  {args[:80]}")
        print(f"  total {total / 1024:.0f} MB")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The scheduler process ends with the API process that started it, and leaves no IPC folder.

The API process makes one temporary folder per engine for its ZMQ sockets, named
``kvyard-<api pid>-<random>``. Every way out removes it:

- a clean stop: ``EngineProcess.stop`` (API side) removes it;
- the API process dies (kill -9, crash): the scheduler notices and removes it before exiting:
  on Linux the kernel sends it SIGTERM (``prctl(PR_SET_PDEATHSIG)``), and on every platform a
  watchdog thread sees its parent pid change within ``POLL_S``;
- both die at once: the next start removes folders whose API pid no longer runs
  (``remove_stale_ipc_dirs``).

PR_SET_PDEATHSIG fires when the *thread* that started the child exits, not the process, so it
is only asked for when the engine was started from the main thread; the watchdog covers the rest.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

POLL_S = 1.0
PR_SET_PDEATHSIG = 1
IPC_PREFIX = "kvyard-"


@dataclass(frozen=True)
class ParentLink:
    pid: int                # the API process
    ipc_dir: str            # its socket folder, removed on the way out
    death_signal: bool      # ask the kernel for SIGTERM when the parent (thread) dies


def make_ipc_dir() -> str:
    remove_stale_ipc_dirs()
    return tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-")


def remove_ipc_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_ipc_dirs() -> None:
    """Folders of API processes that no longer run (both processes were killed)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{IPC_PREFIX}*-*")):
        pid = os.path.basename(path)[len(IPC_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            remove_ipc_dir(path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(link: ParentLink) -> None:
    """Called first thing in the scheduler process."""
    def leave(*_):
        remove_ipc_dir(link.ipc_dir)
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    if link.death_signal and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            pass
    if os.getppid() != link.pid:  # died before the signal was armed
        leave()

    def watchdog() -> None:
        while True:
            time.sleep(POLL_S)
            if os.getppid() != link.pid:
                logger.warning("the API process (pid %d) is gone; the scheduler exits", link.pid)
                leave()
    threading.Thread(target=watchdog, name="kvyard-parent-watch", daemon=True).start()

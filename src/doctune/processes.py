"""How doctune's processes end: SIGINT/SIGTERM become an exception that unwinds (runs are closed, temporary folders
removed), children are ended with their parent, and a process is identified well enough to tell, later, that a
run it left RUNNING belongs to a process that is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager, suppress

import psutil

# How long children get to close their runs after SIGTERM before they are killed.
GRACE_S = 20.0
OWNER_ENV = "DOCTUNE_OWNER"
START_TIME_TOLERANCE_S = 60.0  # a reused pid is a process started later: seconds to days, rarely within a minute


class Interrupted(BaseException):
    """The process was asked to stop (SIGINT, SIGTERM). A BaseException, like KeyboardInterrupt: no `except
    Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stopped_by(exc: BaseException) -> bool:
    return isinstance(exc, Interrupted | KeyboardInterrupt)


def end_children(grace: float = GRACE_S, wait: bool = True) -> None:
    """SIGTERM to every descendant of this process; what still runs after `grace` seconds is killed. With
    `wait=False` the kill happens on a timer thread and this returns at once (for signal handlers)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with suppress(psutil.Error):
            child.terminate()

    def reap() -> None:
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            with suppress(psutil.Error):
                child.kill()

    if wait:
        reap()
    else:
        threading.Thread(target=reap, daemon=True).start()


@contextmanager
def stop_on_signals(end_children_first: bool = False):
    """While active (main thread only), SIGINT and SIGTERM raise Interrupted. With `end_children_first`, the
    handler first sends the children SIGTERM (killed after GRACE_S), so that nothing waiting on them blocks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if end_children_first:
            end_children(wait=False)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def die_with_parent() -> None:
    """This process gets SIGTERM when the doctune process that started the pipeline dies (a component whose
    `doctune run` was killed must not go on writing into the work directory): that process is named in
    $DOCTUNE_OWNER (kfp.local puts a shell between the two, so the parent-death signal alone, also set, is not
    enough); a watchdog thread checks it every second. Exits at once if it is already gone."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, Linux
    owner = os.environ.get(OWNER_ENV, "")
    if not owner:
        return
    pid, _, started = owner.partition(":")

    def gone() -> bool:
        return is_alive(socket.gethostname(), pid, started) is False

    if gone():
        raise Interrupted(signal.SIGTERM)

    def watch() -> None:
        while not gone():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="doctune-owner-watchdog", daemon=True).start()


@contextmanager
def owner_of_children():
    """Name this process in $DOCTUNE_OWNER for the processes it starts while active (see die_with_parent)."""
    saved = os.environ.get(OWNER_ENV)
    me = identity()
    os.environ[OWNER_ENV] = f"{me['pid']}:{me['started']}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = saved


def identity() -> dict[str, str]:
    """This process: host, pid and start time (a pid alone may be reused)."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "started": f"{psutil.Process().create_time():.2f}"}


def is_alive(host: str, pid: str, started: str) -> bool | None:
    """Whether the process is still running; None when it ran on another host (cannot tell from here)."""
    if host != socket.gethostname():
        return None
    try:
        # psutil derives the start time from the boot time, which moves when the clock is stepped (NTP, VM sync)
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < START_TIME_TOLERANCE_S
    except (psutil.Error, ValueError):
        return False

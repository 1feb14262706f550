"""Killing a command's driver mid-run, as a user's Ctrl-\\ or a lost login node would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

from tests.conftest import REPO


def kill_driver_when(args: list[str], ready: Callable[[], bool], *, env: dict[str, str] | None = None,
                     wait_s: float = 240, poll_s: float = 0.1) -> None:
    """Run `python -m <args>` in its own process group, SIGKILL the whole group as soon as
    `ready()` is true, and return; fails if the command ends (or `wait_s` passes) first."""
    driver = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait_s
        while not ready() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(poll_s)
        assert driver.poll() is None, f"{args[0]} ended before its driver could be killed"
        assert ready(), f"{args[0]}: nothing to kill it after within {wait_s} s"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

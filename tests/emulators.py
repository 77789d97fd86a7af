"""Bucket emulators for the tests (``moto_server`` for S3, ``gcp-storage-emulator`` for
GCS, both in the test extra), each started on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def emulator(exe_name: str, argv: Callable[[int], list[str]], install: str) -> Iterator[str]:
    """``exe_name argv(PORT)`` running until the block ends; yields ``http://127.0.0.1:PORT``
    once it accepts connections (fails the test when absent or not up in 30 s)."""
    exe = shutil.which(exe_name) or str(Path(sys.executable).parent / exe_name)
    if not Path(exe).exists():
        pytest.fail(f"{exe_name} not installed: pip install {install} (the test extra)")
    port = free_port()
    proc = subprocess.Popen([exe, *argv(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"{exe_name} did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)

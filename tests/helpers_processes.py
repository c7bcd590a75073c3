"""Helpers for tests that compare work done in other processes with work done in this one.

`Ranks` / `run_ranks` start N ranks (or one process: N=1) of a command the way torchrun does, without
torchrun's launcher process: each rank gets the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which is all `stages/distributed.py` reads. The launcher
would cost every multi-process test one more torch import (about 2 s on 2 cores); one test
(test_tokenize.py) still goes through the real `torchrun`.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time

import torch


@contextlib.contextmanager
def one_thread():
    """Run in-process work with the thread count the driver processes use (OMP_NUM_THREADS=1), so that
    both compute with the same kernels and give the same bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Ranks:
    """`command` started as ranks 0..nproc-1 of one job; `finish()` waits and returns what they did.

    Starting and finishing are separate so that a test can compute its single-process reference while the
    ranks import torch; used as a context manager, ranks still running when the block ends (a failed
    assertion) are killed. Output goes to files rather than pipes, so that a rank never blocks on a full
    pipe while we wait on another.
    """

    def __init__(self, command: list[str], env: dict[str, str], nproc: int = 2, cwd=None) -> None:
        self.command, port = command, str(free_port())
        self.outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(nproc)]
        self.processes = [
            subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, text=True,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                  "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r, (out, err) in enumerate(self.outputs)]

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()

    def _stop(self) -> None:
        """Kill the ranks still running and reap them all."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def finish(self, timeout: float = 240) -> subprocess.CompletedProcess:
        """returncode: the first failing rank's, else 0. When a rank fails the others are killed (they would
        wait for it in a collective), as torchrun does; stdout and stderr hold a "[rank r]" line before
        each rank's part."""
        deadline, timed_out = time.monotonic() + timeout, False
        try:
            while any(p.poll() is None for p in self.processes) and not any(p.returncode for p in self.processes):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            self._stop()
        failed = next((p.returncode for p in self.processes if p.returncode), 0)
        texts = []
        for stream in (0, 1):
            parts = [f"killed after {timeout} s\n"] if timed_out else []
            for r, files in enumerate(self.outputs):
                files[stream].seek(0)
                parts.append(f"[rank {r}]\n{files[stream].read()}")
                files[stream].close()
            texts.append("".join(parts))
        return subprocess.CompletedProcess(self.command, failed, *texts)


def run_ranks(command: list[str], env: dict[str, str], nproc: int = 2, timeout: float = 240,
              cwd=None) -> subprocess.CompletedProcess:
    """Runs `command` as ranks 0..nproc-1 of one job and waits for them (Ranks.finish)."""
    return Ranks(command, env, nproc, cwd).finish(timeout)

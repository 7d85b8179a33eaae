"""Child processes in tests: each starts in its own process group and is killed with every descendant when its
test ends -- also when the test fails or times out (pytest-timeout raises inside the test, which unwinds through
here). A `bash scripts/speedrun.sh` or a torchrun never outlives its test as an orphan."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from contextlib import contextmanager

_live: set[int] = set()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _live.discard(pid)


@atexit.register
def _kill_all() -> None:  # the last line of defence: pytest itself exiting
    for pid in list(_live):
        _kill_group(pid)


@contextmanager
def spawn(cmd: list[str], **kwargs):
    """subprocess.Popen in a new process group; the group is killed when the block exits."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _live.add(proc.pid)
    try:
        yield proc
    finally:
        _kill_group(proc.pid)
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run(cmd: list[str], *, timeout: float = 280, check: bool = False, capture_output: bool = False, input=None,
        **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with the same arguments, its whole process group killed on return, timeout or error. The
    default timeout stays under pytest's per-test limit (300 s), so the test reports this one first."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with spawn(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd))} ran past {timeout} s; killed with its children\n"
                                 f"{_tail(out)}\n{_tail(err)}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def _tail(text, n: int = 3000) -> str:
    if text is None:
        return ""
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    return text[-n:]

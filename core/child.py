"""Child processes that end with their parent, and how a process ended, in words.

The data service's decode children (``pipeline/data/isolation.py``) and preprocessing's encoder child
(``preprocessing/isolated.py``) decode untrusted media in processes their parent may have to kill; both
ask the kernel to kill them when that parent goes, and both report a child's end the same way.
"""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """The kernel sends this process SIGKILL when its parent ends, even while it is stuck in C code. Not
    inherited by a fork: each child asks for itself."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: a child still ends when its connection closes, unless it is stuck
        pass


def exit_text(code: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"

"""A command run in a pseudo-terminal, as a person at a terminal would run it (stdlib only).

The child is a session leader with the pty as its controlling terminal, so writing Ctrl-C
(``\\x03``) makes the terminal send it SIGINT, exactly as pressing the keys does.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence

__all__ = ["Terminal", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


def strip_ansi(text: str) -> str:
    """The text without colour and cursor control sequences, and without carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


def _take_terminal() -> None:  # runs in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None = None,
        columns: int = 160,
        rows: int = 40,
    ) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.process = subprocess.Popen(
            list(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self._master = master
        self._raw = bytearray()

    @property
    def output(self) -> str:
        """Everything the command printed so far, control sequences removed."""
        return strip_ansi(self._raw.decode("utf-8", errors="replace"))

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the terminal is closed."""
        ready, _, _ = select.select([self._master], [], [], max(0.0, timeout))
        if not ready:
            return True
        try:
            chunk = os.read(self._master, 65536)
        except OSError:  # EIO: the child closed its side
            return False
        if not chunk:
            return False
        self._raw.extend(chunk)
        return True

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait until the output matches ``pattern`` (a regex); the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.output)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.1)):
                if (found := regex.search(self.output)) is not None:
                    return found
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.output}")

    def send(self, data: bytes) -> None:
        os.write(self._master, data)

    def wait(self, timeout: float = 15.0) -> int:
        """The exit status, reading output until the command ends."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if not self._read(0.05):
                break
        code = self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        while self._read(0.05):  # what was left in the terminal's buffer
            if not select.select([self._master], [], [], 0)[0]:
                break
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self._master)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

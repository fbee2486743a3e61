"""A progress bar on stderr fed by the host's /ws messages: tqdm when installed, else a plain one."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.n = total, initial
        self.status = ""
        self.servers = ""  # several servers: each one's count and rate
        self._bar = None
        self._tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_draw = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, unit="img", file=self.stream,
                                 dynamic_ncols=True, smoothing=0.1, mininterval=0.2)
            except ImportError:
                self._bar = None

    def set_status(self, text: str) -> None:
        """What runs now, e.g. ``dog-s1-0a1b2c sample 3/25``."""
        self.status = text
        self._show()

    def set_servers(self, text: str) -> None:
        """Each server's share and rate, e.g. ``gpu1:8188 12 (3.1/min), gpu2:8188 down``."""
        self.servers = text
        self._show()

    def _text(self) -> str:
        return " | ".join(t for t in (self.servers, self.status) if t)

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._text(), refresh=False)
            if time.monotonic() - self._last_draw > 0.2:
                self._bar.refresh()
                self._last_draw = time.monotonic()
        else:
            self._draw()

    def advance(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._draw(force=True)

    def write(self, line: str) -> None:
        """A log line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            if self._tty:
                self.stream.write("\r\033[K")
            self.stream.write(line + "\n")
            self._draw(force=True)
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self._tty or (not force and time.monotonic() - self._last_draw < 0.1):
            return
        self._last_draw = time.monotonic()
        width = 30
        filled = int(width * self.n / self.total) if self.total else width
        self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} {self._text()}"[:200])
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._tty:
            self.stream.write("\n")
            self.stream.flush()

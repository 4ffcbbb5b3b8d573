"""The CLI's progress display: the runner's ProgressEvents (stage, step k/N, message, ETA) on a stream.

On a terminal, one line per stage, redrawn in place with `\\r`:

    denoising [##########----------] 2/4 ETA 0:03  low-noise expert

and ended with a newline (the final count and the stage's time) when the stage changes. Log records
written to the same stream clear the bar first and redraw it after, so the two never share a line.
Elsewhere (a pipe, a log file) no `\\r` at all: one timestamped line when a stage starts and one with its
final count when it ends:

    18:03:12 denoising: denoising step 1/40 · high-noise expert
    18:04:51 denoising: denoising step 40/40 · low-noise expert (1:39)

Self-contained on purpose: tqdm draws one counter per bar, and the runner's events are a sequence of stages
(some without a count, some restarting theirs) that share one line; the rules below are that sequence's.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TextIO

MODES = ("auto", "bar", "lines", "off")
BAR_WIDTH = 20
REDRAW_S = 0.1  # at most ten redraws a second; a stage's first and last count always draw


def format_duration(seconds: float) -> str:
    """1.2 s, 42 s, then m:ss, and h:mm:ss past an hour."""
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def template(message: str) -> str:
    """The message with its numbers taken out: the same template means the same segment of a stage."""
    return re.sub(r"\d+", "#", message)


@dataclass
class Segment:
    """One line's worth of a stage: from its first event until the stage, or the message's kind, changes."""

    stage: str
    kind: str
    started: float
    step: int = 0
    total: int = 0
    message: str = ""
    eta_s: float | None = None
    first_step: int = 0
    first_at: float = 0.0
    updated: float = 0.0

    def update(self, step: int, total: int, message: str, eta_s: float | None, now: float) -> None:
        if total and not self.total:  # the first count of a segment that began with a header ("decoding")
            self.first_step, self.first_at, self.kind = step, now, template(message)
        self.step, self.total, self.message, self.eta_s, self.updated = step, total, message, eta_s, now

    def eta(self, now: float) -> float | None:
        """The runner's ETA when it gives one, else the rate since this segment's first count."""
        if self.eta_s is not None:
            return self.eta_s
        done = self.step - self.first_step
        if done <= 0 or not self.total:
            return None
        return (now - self.first_at) / done * (self.total - self.step)

    def detail(self) -> str:
        """The message less what the bar already says: the count, and the stage's own word before it."""
        count = f"{self.step}/{self.total}"
        if not self.total or count not in self.message:
            return self.message
        before, after = self.message.split(count, 1)
        words = before.split()
        lead = words[0] if words and words[0] != self.stage else ""
        return " · ".join(part for part in (lead, after.strip(" ·:")) if part)


class ProgressRenderer:
    """Feed it ProgressEvents (`renderer(event)`) or `update(stage, step, total, message, eta_s)`;
    use it as a context manager (or call `close()`) so the last line is finished."""

    def __init__(self, stream: TextIO, mode: str = "auto", width: int | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: use one of {', '.join(MODES)}")
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
        self.stream, self.mode = stream, ("bar" if tty else "lines") if mode == "auto" else mode
        self.width = width
        self.segment: Segment | None = None
        self.drawn = 0  # characters of the bar now on the line (0: the cursor is at the start of a clean line)
        self.lock = threading.RLock()
        self.hooked: list[logging.Handler] = []
        self.chars = _bar_chars(stream)

    # ---------------------------------------------------------------- events in

    def __call__(self, event) -> None:
        self.update(event.stage, event.step, event.total, event.message, event.eta_s)

    def update(self, stage: str, step: int = 0, total: int = 0, message: str = "", eta_s: float | None = None) -> None:
        if self.mode == "off":
            return
        with self.lock:
            now = time.monotonic()
            seg = self.segment
            if seg is None or self._starts_segment(seg, stage, step, message):
                self._end_segment()
                if stage == "done":  # the path goes to stdout; nothing to draw
                    return
                seg = self.segment = Segment(stage, template(message), now, first_step=step, first_at=now)
                seg.update(step, total, message, eta_s, now)
                self._begin_segment(seg)
                return
            last, previous_total = seg.updated, seg.total
            seg.update(step, total, message, eta_s, now)
            final = total and step >= total
            if self.mode == "bar" and (final or not previous_total or now - last >= REDRAW_S):
                self._draw(seg, now)

    @staticmethod
    def _starts_segment(seg: Segment, stage: str, step: int, message: str) -> bool:
        """A new line: another stage, a count that starts over (a retry, the next finishing step), or a
        message of another kind after a counted one (the expert switch); a header without a count
        ("decoding") is taken over by its stage's first count."""
        if stage != seg.stage or (seg.total and step < seg.step):
            return True
        return bool(seg.total) and template(message) != seg.kind

    # ---------------------------------------------------------------- lines out

    def _begin_segment(self, seg: Segment) -> None:
        if self.mode == "bar":
            self._draw(seg, seg.started)
        else:
            self._write_line(seg.stage, seg.message, seg.started)

    def _end_segment(self) -> None:
        seg, self.segment = self.segment, None
        if seg is None:
            return
        now = time.monotonic()  # the stage lasts until the next one starts
        if self.mode == "bar":
            self._draw(seg, now, done=True)
            self.stream.write("\n")
            self.drawn = 0
        elif seg.total and seg.step != seg.first_step:
            self._write_line(seg.stage, f"{seg.message} ({format_duration(now - seg.started)})", now)
        self.stream.flush()

    def _write_line(self, stage: str, message: str, at: float) -> None:
        wall = time.time() - (time.monotonic() - at)
        self.stream.write(f"{time.strftime('%H:%M:%S', time.localtime(wall))} {stage}: {message}\n")
        self.stream.flush()

    def _draw(self, seg: Segment, now: float, done: bool = False) -> None:
        line = self.bar_line(seg, now, done)[: self._columns() - 1]
        self.stream.write("\r" + line.ljust(self.drawn))
        self.stream.flush()
        self.drawn = len(line)

    def bar_line(self, seg: Segment, now: float, done: bool = False) -> str:
        """`stage [####------] k/N ETA m:ss  detail`; a stage without a count: `stage  message`."""
        elapsed = format_duration(now - seg.started)
        if not seg.total:
            return f"{seg.stage:<9} {seg.message}" + (f" ({elapsed})" if done else "")
        fill, empty = self.chars
        filled = min(BAR_WIDTH, BAR_WIDTH * max(seg.step, 0) // seg.total)
        eta = seg.eta(now)
        when = f"in {elapsed}" if done else "ETA " + (format_duration(eta) if eta is not None else "?")
        detail = seg.detail()
        bar = f"[{fill * filled}{empty * (BAR_WIDTH - filled)}]"
        return f"{seg.stage:<9} {bar} {seg.step}/{seg.total} {when}" + (f"  {detail}" if detail else "")

    def _columns(self) -> int:
        if self.width:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, OSError, ValueError):
            return 80

    # ---------------------------------------------------------------- logging and lifetime

    def _clear(self) -> None:
        """Take the bar off its line (a log record is about to be written there)."""
        if self.drawn:
            self.stream.write("\r" + " " * self.drawn + "\r")
            self.stream.flush()

    def _redraw(self) -> None:
        if self.segment is not None and self.drawn:
            self._draw(self.segment, time.monotonic())

    def hook_logging(self, logger: logging.Logger | None = None) -> None:
        """Records of handlers that write to this stream clear the bar first and redraw it after."""
        if self.mode != "bar":
            return
        for handler in (logger or logging.getLogger()).handlers:
            if getattr(handler, "stream", None) is self.stream and handler not in self.hooked:
                handler.emit = self._wrapped_emit(handler.emit)  # instance attribute; removed in close()
                self.hooked.append(handler)

    def _wrapped_emit(self, emit):
        def wrapped(record: logging.LogRecord) -> None:
            with self.lock:
                self._clear()
                emit(record)
                self._redraw()

        return wrapped

    def close(self) -> None:
        with self.lock:
            self._end_segment()
            for handler in self.hooked:
                handler.__dict__.pop("emit", None)
            self.hooked.clear()

    def __enter__(self) -> "ProgressRenderer":
        self.hook_logging()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bar_chars(stream: TextIO) -> tuple[str, str]:
    """Block characters where the stream's encoding has them, else ASCII."""
    try:
        "█░".encode(getattr(stream, "encoding", None) or "ascii")
        return "█", "░"
    except (UnicodeEncodeError, LookupError):
        return "#", "-"

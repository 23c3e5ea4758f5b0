"""Progress bars (rich) for long work; disabled unless the caller asks, so tests stay quiet."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)

    def finish(self) -> None:
        """Done, for work whose total was only an upper bound (the bar shows it complete)."""
        if self._progress is not None:
            task = next(t for t in self._progress.tasks if t.id == self._task)
            self._progress.update(self._task, completed=task.total)


@contextlib.contextmanager
def bar(description: str, total: int, *, enabled: bool, fields: str = "",
        completed: int = 0) -> Iterator[_Bar]:
    """A rich progress bar on stderr with elapsed time and ETA.

    ``fields`` is a rich format string using ``task.fields`` (e.g. ``"loss {task.fields[loss]}"``);
    pass the initial values to ``advance``/``update``. ``completed`` is work already done
    before this process (a resumed run): the bar starts there, and the ETA is estimated from
    this process's own pace only.
    """
    if not enabled or total <= 0:  # nothing to do: no bar (a 0/0 line says nothing)
        yield _Bar(None, None)
        return
    if not sys.stderr.isatty():
        # A log file, not a terminal: rich would draw nothing until the end, so print a plain
        # line now and then that `tail -f` can follow.
        plain = _PlainBar(description, total, fields, completed)
        yield plain
        plain.line(final=True)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if fields:
        columns.append(TextColumn(fields))
    console = Console(file=sys.stderr)
    with Progress(*columns, console=console, transient=False) as progress:
        # rich's speed comes from the advances it samples, not from a task's starting point
        task = progress.add_task(description, total=total, completed=completed,
                                 **_field_defaults(fields))
        yield _Bar(progress, task)


class _PlainBar:
    every_s = 15.0

    def __init__(self, description: str, total: int, fields: str, completed: int = 0):
        import time

        self.description, self.total, self.fields = description, total, fields
        self.done = self.start = completed
        self.values = _field_defaults(fields)
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.update(**fields)

    def finish(self) -> None:
        self.done = self.total

    def update(self, **fields) -> None:
        import time

        self.values.update(fields)
        if time.monotonic() - self.last >= self.every_s:
            self.line()

    def line(self, final: bool = False) -> None:
        import time

        now = time.monotonic()
        self.last = now
        elapsed = now - self.t0
        ran = self.done - self.start  # the pace of this process, not of the run it resumed
        eta = f"{elapsed / ran * (self.total - self.done):.0f}s" if ran > 0 else "?"
        text = re.sub(r"\{task\.fields\[(\w+)\]\}", lambda m: str(self.values.get(m[1], "-")),
                      self.fields)
        print(f"{self.description} {self.done}/{self.total} elapsed {elapsed:.0f}s "
              f"eta {eta} {text}".rstrip(), file=sys.stderr, flush=True)


def _field_defaults(fields: str) -> dict:
    return {name: "-" for name in re.findall(r"task\.fields\[(\w+)\]", fields)}

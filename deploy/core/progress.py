"""rich progress bars on stderr (disabled when not wanted)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        task = bar.add_task(label, total=total, info="")
        yield bar, task

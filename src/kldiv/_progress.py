"""Progress bars for the streaming helpers: tqdm, else rich, else none."""

from __future__ import annotations

import sys
from typing import Any, Protocol

__all__ = ["Bar", "progress_bar"]


class Bar(Protocol):
    def update(self, n: int) -> Any: ...

    def close(self) -> Any: ...


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int | None, desc: str) -> None:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(file=sys.stderr)
        # in a terminal the bar goes away when done; in a log, the final state stays
        self._progress = Progress(console=console, transient=console.is_terminal)
        self._progress.start()
        self._task = self._progress.add_task(desc, total=total)

    def update(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()


_KINDS = {True: ("tqdm", "rich"), "auto": ("tqdm", "rich"), "tqdm": ("tqdm",), "rich": ("rich",)}


def check_progress(progress: Any) -> bool | str | None:
    """``progress`` as one of ``True``, ``False``, ``None``, ``"tqdm"``, ``"rich"``, ``"auto"``."""
    if progress is None or (isinstance(progress, str) and progress in _KINDS):
        return progress
    if type(progress) is bool or type(progress).__name__ == "bool_":  # NumPy's bool too
        return bool(progress)
    raise ValueError(f"progress must be True, False, None, 'tqdm' or 'rich'; got {progress!r}.")


def progress_bar(progress: bool | str | None, total: int | None, desc: str) -> Bar:
    """A bar with ``update(n)`` / ``close()``: tqdm, else rich; ``None`` means "if a terminal"."""
    progress = check_progress(progress)
    if progress is None:
        progress = "auto" if sys.stderr.isatty() else False
    if progress is False:
        return _NoBar()
    kinds = _KINDS[progress]
    for kind in kinds:
        if kind == "tqdm":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                continue
            bar: Bar = tqdm(total=total, desc=desc, unit="row", unit_scale=True, file=sys.stderr,
                            leave=False, dynamic_ncols=True)
            return bar
        try:
            return _RichBar(total, desc)
        except ImportError:
            continue
    if progress == "auto":
        return _NoBar()
    raise ImportError(
        f"progress={progress!r} needs {' or '.join(kinds)}: pip install 'kldiv[progress]' (tqdm)."
    )

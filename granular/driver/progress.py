"""rich progress for long searches: a bar per epoch and one summary line per epoch."""

from __future__ import annotations

from typing import Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from granular._format import fmt_count, fmt_pct

__all__ = ["SearchProgress"]


class SearchProgress:
    """Context manager; a no-op when ``enabled`` is False."""

    def __init__(self, *, enabled: bool, target: int, epochs: int, console: Optional[Console] = None):
        self.enabled = enabled
        self.target = target
        self.epochs = epochs
        self.console = console or Console(stderr=True)
        self.progress: Optional[Progress] = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def batch_callback(self, epoch: int, total: int) -> Optional[Callable]:
        if self.progress is None:
            return None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{self.epochs}", total=total, stats="")

        def update(i: int, loss: float, acc: float) -> None:
            self.progress.update(self.task, completed=i, stats=f"loss {loss:.3f} acc {fmt_pct(acc)}")

        return update

    def epoch_done(self, row: dict) -> None:
        if not self.enabled:
            return
        extra = ""
        if row.get("round"):
            extra = f" | round {row['round']}: -{fmt_count(row['pruned_params'])}, λ {row['lambda']:.2g}"
        self.console.print(
            f"epoch {row['epoch']:>3}/{self.epochs} {row['phase']:<6} loss {row['loss']:.3f} "
            f"acc {fmt_pct(row['train_acc'])} val {fmt_pct(row['val_acc'])} | params "
            f"{fmt_count(row['params'])}/{fmt_count(self.target)} | keep op {fmt_pct(row['keep_op'])} "
            f"filter {fmt_pct(row['keep_filter'])} weight {fmt_pct(row['keep_weight'])}{extra}",
            highlight=False, soft_wrap=True)

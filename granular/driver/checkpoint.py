"""Checkpoints and the metrics log of a search: written by rank 0 every epoch, read back by
``--resume`` (every rank), so that a killed search continues where it stopped."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from granular import distributed
from granular.errors import CheckpointError
from granular.files import CHECKPOINT, METRICS, append_jsonl, save_torch, write_jsonl

__all__ = ["CheckpointMixin", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


class CheckpointMixin:
    """Checkpointing of :class:`~granular.driver.searcher.Searcher`."""

    def checkpoint(self) -> None:
        if self.run_dir is None or not distributed.is_main():  # rank 0 writes; every rank can read it
            return
        state = {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "state": self.state,
                 "history": self.history, "model": self.gm.state_dict(), "opt_w": self.opt_w.state_dict(),
                 "opt_a": self.opt_a.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, **self.checkpoint_extra()}
        save_torch(state, self.run_dir / CHECKPOINT)

    def checkpoint_extra(self) -> dict[str, Any]:
        """More to save (a subclass's own state); restored by :meth:`resume_extra`."""
        return {}

    def resume_extra(self, ck: dict[str, Any]) -> None:
        """Rebuild what training needs for the checkpoint's state, then load the optimisers."""
        self.net = self.build_net()
        self.opt_w.load_state_dict(ck["opt_w"])
        self.opt_a.load_state_dict(ck["opt_a"])

    def resume(self, path: Path) -> None:
        try:
            ck = torch.load(path, map_location=self.device, weights_only=False)
            if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a granular checkpoint")
            self.gm.load_state_dict(ck["model"])
            self.state.update(ck["state"])
            self._active_cache = None
            self.resume_extra(ck)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the user's to fix
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"cannot resume from {path}: the checkpoint is corrupt or from another "
                                  f"run ({first}); delete it to start over") from None
        self.history = list(ck["history"])
        if self.run_dir is not None and distributed.is_main():
            # the log may hold an epoch the checkpoint does not: rewrite it
            write_jsonl(self.run_dir / METRICS, self.history)
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        self.sync_state(full=True)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.run_dir is not None and distributed.is_main():
            append_jsonl(self.run_dir / METRICS, row)

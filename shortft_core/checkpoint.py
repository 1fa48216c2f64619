"""Training checkpoints shared by every loop (distillation, reward fine-tuning): atomic, exact, pickle-free.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (adapter weights, optimizer
and LR-scheduler state, step, RNG states, JSON-able metadata), so ``torch.load(weights_only=True)`` reads it and
no pickled code ever runs. Files are written beside their final name and renamed into place; ``latest.json``
points at the newest complete one, so a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .files import atomic_save, atomic_write_json

log = logging.getLogger(__name__)


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA) and of named generators. Training loops draw all randomness from these;
    numpy's and Python's global generators are never used for training decisions."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k])


class CheckpointManager:
    """Numbered checkpoints in ``folder`` (``step-0000100.pt``), newest ``keep`` kept, ``latest.json`` pointer."""

    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:07d}.pt"
        atomic_save(path, lambda p: torch.save({"step": step, **payload}, p))
        atomic_write_json(self.folder / "latest.json", {"step": step, "file": path.name})
        for old in sorted(self.folder.glob("step-*.pt"))[: -self.keep]:
            old.unlink()
        log.info("checkpoint %s", path)
        return path

    def latest(self) -> Path | None:
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        path = self.folder / json.loads(pointer.read_text(encoding="utf-8"))["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{pointer} points at {path.name}, which is missing; delete {pointer} to start over")
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        return torch.load(str(path), map_location="cpu", weights_only=True)

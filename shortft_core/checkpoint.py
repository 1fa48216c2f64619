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
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from .io import atomic_save, atomic_write_json

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


def setting(default: Any, help: str, *, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config dataclass field with its command-line help (``train --help`` / ``distill --help`` show it) and
    the range or the choices ``check_bounds`` enforces (None values of optional settings are always allowed)."""
    bounds = {k: v for k, v in (("at_least", at_least), ("above", above), ("at_most", at_most)) if v is not None}
    meta = {"help": help, "bounds": bounds}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


def outside(value: float, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None) -> bool:
    """True when ``value`` is NaN or breaks one of the bounds given (shared by config checks and CLI numbers)."""
    return (value != value or (at_least is not None and value < at_least) or (above is not None and value <= above)
            or (at_most is not None and value > at_most))


def check_bounds(cfg: Any) -> None:
    """Raise ValueError naming the setting, its flag and its range (or choices) for the first value outside them."""
    for f in fields(cfg):
        bounds, choices, value = f.metadata.get("bounds"), f.metadata.get("choices"), getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} ({flag}) must be one of {', '.join(choices)}; got {value!r}")
        if not bounds or value is None:
            continue
        lo, gt, hi = bounds.get("at_least"), bounds.get("above"), bounds.get("at_most")
        if outside(value, lo, gt, hi):
            parts = ([f">= {lo:g}"] if lo is not None else []) + ([f"> {gt:g}"] if gt is not None else []) \
                + ([f"<= {hi:g}"] if hi is not None else [])
            raise ValueError(f"{f.name} ({flag}) must be {' and '.join(parts)}; got {value}")


def changed_config(old: Mapping[str, Any], now: Mapping[str, Any], defaults: Mapping[str, Any],
                   ignore: tuple[str, ...] = ()) -> list[str]:
    """Names of the settings of ``now`` that differ from ``old`` (both JSON-like config dicts); a setting added after
    ``old`` was written counts at its default, which it had then."""
    return sorted(k for k in now if k not in ignore and old.get(k, defaults[k]) != now[k])


def changed_settings(saved: str, cfg: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names of ``cfg``'s settings that differ from a checkpoint's (its JSON config), by :func:`changed_config`.
    ``cfg`` is a dataclass with ``to_dict``."""
    now = json.loads(json.dumps(cfg.to_dict()))
    defaults = json.loads(json.dumps(type(cfg)().to_dict()))
    return changed_config(json.loads(saved), now, defaults, ignore)


def clip_gradients(params, max_norm: float) -> float:
    """Clip the parameters' global gradient norm to ``max_norm`` (0 or less: no clipping) and return the norm
    before clipping; torch's own clip with 0 would zero every gradient, which no user setting 0 means."""
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def all_finite(tensors) -> bool:
    """True when every tensor (e.g. every gradient) is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)

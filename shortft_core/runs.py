"""Run folders: what identifies a run, and the one rule for a folder that already holds one.

A run folder holds ``run.json`` (status, iterations done, the settings that identify the run), ``checkpoints/`` and
the run's outputs. A run asked for in a folder meets one of four cases:

- nothing there: it starts;
- a run with the same settings: a finished one is returned without training (unless more iterations are asked
  for: it continues), a partial one continues exactly from its newest checkpoint;
- a run with other settings: refused, naming the settings that differ, unless ``overwrite``, which starts over;
- earlier files without ``run.json``: refused the same way (they belong to a run nothing identifies).

Training and distillation sessions both follow it (:mod:`shortft_core.session`), and so do their hosts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import atomic_write_json
from .settings import changed_config

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
FINISHED, PARTIAL, STOPPED, REUSED = "finished", "partial", "stopped", "reused"


def differing_settings(old: Mapping[str, Any], new: Mapping[str, Any], config_type: type,
                       may_change: Sequence[str] = ()) -> list[str]:
    """Names of the settings that differ between two runs' ``settings``: the config's fields by their own names (a
    field added after a run was written counts at its default, a renamed one under its new name; ``may_change``
    never counts), every other entry as a whole."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "config":
            out += changed_config(a or {}, b or {}, config_type().to_dict(), tuple(may_change),
                                  getattr(config_type, "RENAMED", None))
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(key)
    return out


@dataclass
class RunFolder:
    """One run's folder. ``config_type`` and ``may_change`` say how its config is compared (the settings a
    continued run may change, such as the number of iterations); ``outputs`` are the files or folders its runs
    write besides checkpoints, whose presence without a ``run.json`` marks an unidentified earlier run."""

    path: Path
    config_type: type
    may_change: tuple[str, ...] = ()
    outputs: tuple[Path, ...] = ()

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def previous(self, settings: Mapping[str, Any], overwrite: bool) -> dict | None:
        """The run in the folder with these ``settings`` (its run.json), or None when there is none to continue
        (an empty folder, or another run that ``overwrite`` will replace). Raises ValueError for another run without
        ``overwrite``, naming what differs and the fix."""
        if not self.run_file.is_file():
            found = [str(p) for p in (self.checkpoints, *self.outputs) if _holds_something(p)]
            if found and not overwrite:
                raise ValueError(f"{' and '.join(found)} hold an earlier run's files but {self.run_file} is missing; "
                                 "pass overwrite=True (--overwrite) to start over, or choose another folder")
            return None
        previous = json.loads(self.run_file.read_text(encoding="utf-8"))
        diff = differing_settings(previous.get("settings", {}), settings, self.config_type, self.may_change)
        if diff and not overwrite:
            raise ValueError(f"run folder {self.path} holds a run with other settings ({', '.join(diff)}); use the "
                             "same settings to continue or reuse it, pass overwrite=True (--overwrite) to start over, "
                             "or choose another folder")
        return None if diff else previous

    @staticmethod
    def done(previous: Mapping[str, Any] | None, wanted: int | None) -> bool:
        """Whether ``previous`` is a finished run that already did ``wanted`` iterations (None: any number, e.g. a
        run by time budget), so it is returned instead of continued."""
        return (previous is not None and previous.get("status") == FINISHED
                and (wanted is None or int(previous.get("iteration", 0)) >= wanted))

    def start_over(self) -> None:
        """Delete the earlier run's checkpoints and run file (its outputs are replaced when the new run writes
        them)."""
        if self.checkpoints.is_dir():
            for f in self.checkpoints.iterdir():
                if f.is_file():
                    f.unlink(missing_ok=True)
        self.run_file.unlink(missing_ok=True)

    def write(self, status: str, iteration: int, settings: Mapping[str, Any], **extra: Any) -> None:
        """Record the run (atomically): its status, iterations done, its settings and ``extra`` entries."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_file, {"status": status, "iteration": iteration, "settings": dict(settings),
                                          **extra})


def _holds_something(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))

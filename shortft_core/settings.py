"""Settings declared once: a config dataclass field carries its help text and its range or choices, which drive the
command-line flags, the validation and its error messages; and the rule that compares the settings of a saved run
with a new one (checkpoint resume and run-folder reuse share it).
"""

from __future__ import annotations

import json
from dataclasses import field, fields
from typing import Any, Mapping


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


def upgrade_settings(saved: Mapping[str, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    """A saved config dict with the settings renamed since it was written under their present names."""
    return {renamed.get(k, k): v for k, v in saved.items()}


def changed_config(old: Mapping[str, Any], now: Mapping[str, Any], defaults: Mapping[str, Any],
                   ignore: tuple[str, ...] = (), renamed: Mapping[str, str] | None = None) -> list[str]:
    """Names of the settings of ``now`` that differ from ``old`` (both JSON-like config dicts); a setting renamed
    since ``old`` was written is read under its new name (``renamed``: old -> new), and one added since counts at
    its default, which it had then."""
    old = upgrade_settings(old, renamed or {})
    return sorted(k for k in now if k not in ignore and old.get(k, defaults[k]) != now[k])


def changed_settings(saved: str, cfg: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names of ``cfg``'s settings that differ from a checkpoint's (its JSON config), by :func:`changed_config`.
    ``cfg`` is a dataclass with ``to_dict``; its class may name settings renamed since (``RENAMED``)."""
    now = json.loads(json.dumps(cfg.to_dict()))
    defaults = json.loads(json.dumps(type(cfg)().to_dict()))
    return changed_config(json.loads(saved), now, defaults, ignore, getattr(type(cfg), "RENAMED", None))

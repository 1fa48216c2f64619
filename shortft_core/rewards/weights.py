"""Finding and loading reward weight files safely: local files only, no pickled code, strict key checks.

Every reward names the file it expects, the folders it searched and where the file is published (as text: no
hub is ever contacted), so a missing or wrong file is fixed from the error message alone.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..files import check_safetensors

log = logging.getLogger(__name__)


class RewardWeightsNotFound(FileNotFoundError):
    """A reward's weight file or folder is not where it was looked for."""


class RewardKeyMismatch(ValueError):
    """A weight file does not hold the expected parameters (wrong file, or wrong architecture option)."""


def locate(what: str, expected: Sequence[str], published: str, path: str | os.PathLike | None = None,
           search_dirs: Sequence[str | os.PathLike | None] = (), marker: str | None = None,
           files: bool = True) -> Path:
    """Return the file, or folder holding ``marker`` (e.g. ``config.json``), that ``what`` needs.

    ``path`` wins when given: it may be the file/folder itself or a folder holding one of the ``expected``
    names. Otherwise each of ``search_dirs`` is tried for each expected name. ``files=False`` accepts folders
    only. The error lists every place tried and where the weights are published.
    """
    tried: list[Path] = []

    def ok(p: Path) -> bool:
        tried.append(p)
        if files and p.is_file():
            return True
        return marker is not None and p.is_dir() and (p / marker).is_file()

    if path is not None:
        p = Path(path).expanduser()
        if ok(p):
            return p
        if p.is_dir():
            for name in expected:
                if ok(p / name):
                    return p / name
    else:
        for d in search_dirs:
            if d is None:
                continue
            for name in expected:
                if ok(Path(d).expanduser() / name):
                    return Path(d).expanduser() / name
    names = " or ".join(repr(n) for n in expected)
    where = ", ".join(str(t) for t in tried) or "nowhere (no path and no weights folder given)"
    kind = "file" if marker is None else (f"folder with {marker}" if not files else f"file or folder with {marker}")
    raise RewardWeightsNotFound(
        f"{what}: expected the {kind} {names}; looked for {where}. It is published at {published}. "
        "Download it yourself (nothing is downloaded at run time) and pass its path, or put it in the weights folder."
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a ``torch.save`` checkpoint, loaded with ``weights_only=True``.

    A checkpoint that needs pickled code (a whole pickled module, a TorchScript archive) is refused.
    Nested ``{'state_dict': ...}`` / ``{'model': ...}`` checkpoints are unwrapped. A damaged safetensors file is
    refused from its header (:func:`~shortft_core.files.check_safetensors`) before any tensor is read.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path, "reward weights")
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise ValueError(
            f"{path} is not a plain tensor checkpoint (loading it would execute pickled code, which this project "
            f"never does): {str(e).splitlines()[0]}. Convert it to safetensors or a state_dict in a trusted "
            "environment first."
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj


def check_weight_files(what: str, path: Path) -> None:
    """Check the header of every safetensors file a located reward slot provides: the file itself, or those
    directly in its folder (a transformers folder's ``model.safetensors``), so a damaged download is reported
    before the reward's architecture is built."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f, f"{what} weights")


def check_keys(what: str, path: str | os.PathLike, expected: Iterable[str], found: Iterable[str],
               show: int = 12) -> None:
    """Raise :class:`RewardKeyMismatch` unless ``found`` equals ``expected``, listing the differences."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def fmt(keys: list[str]) -> str:
            more = f" ... (+{len(keys) - show} more)" if len(keys) > show else ""
            return ", ".join(keys[:show]) + more if keys else "none"

        raise RewardKeyMismatch(
            f"{what}: {path} does not match the expected architecture: {len(missing)} missing keys [{fmt(missing)}]; "
            f"{len(unexpected)} unexpected keys [{fmt(unexpected)}]. Is it the right file for this reward "
            "(and the right architecture option)?"
        )


def check_shapes(what: str, path: str | os.PathLike, model_state: dict[str, torch.Tensor],
                 loaded: dict[str, torch.Tensor]) -> None:
    """Raise :class:`RewardKeyMismatch` when a tensor's shape differs from the model's."""
    bad = [f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
           for k, v in model_state.items() if k in loaded and tuple(loaded[k].shape) != tuple(v.shape)]
    if bad:
        raise RewardKeyMismatch(f"{what}: {path} has tensors of the wrong shape ({len(bad)}): {'; '.join(bad[:8])}. "
                                "Is it the right file for this reward (and the right architecture option)?")


def load_strict(what: str, module: torch.nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Check keys and shapes, then load ``state`` into ``module`` (cast to the module's dtypes)."""
    own = module.state_dict()
    check_keys(what, path, own.keys(), state.keys())
    check_shapes(what, path, own, state)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)

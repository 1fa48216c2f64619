"""Files: durable writes and a check of safetensors files before they are read.

Everything the project writes goes to a temporary file first and is renamed into place, so an interrupted run
never leaves a half-written checkpoint, LoRA or image behind; the file gets the mode a plain ``open()`` would give
it under the process's umask. A ``.safetensors`` file a user hands over is checked header-first
(:func:`check_safetensors`), so a damaged or truncated download ends with one message naming it before any model
is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask_once() -> int:
    """The umask at import time: ``os.umask`` can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ``os.umask`` is process-wide and can only be read by changing it, so calling it while another thread creates a
# file (ComfyUI's server threads, a DataLoader) would hand that file the wrong mode. It is therefore called once,
# at import, and every write reads the current value from /proc/self/status (Linux >= 4.7), which changes nothing;
# elsewhere the import-time value is used.
_IMPORT_UMASK = _umask_once()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (see ``_IMPORT_UMASK``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``tempfile.mkstemp`` creates the file private (0600); it is given the umask's mode before the rename, so the
    result is as readable as any file the user's other tools write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, new_file_mode())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Run ``writer(tmp_path)`` (e.g. ``safetensors.torch.save_file``) and move the result into place."""
    with atomic_path(path) as tmp:
        writer(str(tmp))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_overwrite(path: str | os.PathLike, overwrite: bool, what: str = "file") -> None:
    """Raise if ``path`` exists and the caller did not ask to overwrite it."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{what} {path} already exists; choose another path or pass overwrite=True (--overwrite)")


# ----- safetensors headers ------------------------------------------------------------------------------------
class SafetensorsFileError(ValueError):
    """A file that should be safetensors but whose header does not describe a whole, readable file."""


# Bits per element of every dtype the safetensors format (0.8) defines.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6,
               "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
               "C64": 64, "I64": 64, "U64": 64, "F64": 64}
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file's header says: its ``__metadata__`` and, per tensor, dtype, shape and offsets."""

    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_safetensors(path: str | os.PathLike, what: str = "file") -> SafetensorsHeader:
    """Read and check the header of the safetensors file ``path`` without reading a tensor, and return it.

    The checks are the ones the safetensors library makes when it opens a file (header length within the file,
    a JSON object, every tensor's dtype, shape and byte range consistent, the ranges tiling the data exactly up
    to the end of the file), so a file that passes opens, and one that does not (a truncated download, another
    file type renamed) raises :class:`SafetensorsFileError` (a ValueError, which the command line prints as one
    line) naming ``what`` and the file, before any model is built. A missing file is a FileNotFoundError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found (looked for that exact file)")

    def bad(reason: str) -> SafetensorsFileError:
        return SafetensorsFileError(
            f"{what} {path} is not a valid safetensors file ({reason}); it is damaged or incomplete (an interrupted "
            "download or copy?): replace it with a complete copy")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER:
            raise bad(f"its first 8 bytes give a header of {n} bytes, over the format's limit of {_MAX_HEADER}")
        if 8 + n > size:
            raise bad(f"its header of {n} bytes runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header is not a JSON object")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"unreadable header: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a mapping of strings to strings")
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} lacks dtype, shape or data_offsets") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)):
            raise bad(f"tensor {name!r} has a shape or offsets that are not non-negative integers")
        bits = _DTYPE_BITS.get(dtype)
        if bits is None:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if (end - begin) * 8 != math.prod(shape) * bits:
            raise bad(f"tensor {name!r} ({dtype} {shape}) needs {math.prod(shape) * bits / 8:g} bytes but its "
                      f"offsets span {end - begin}")
        spans.append((begin, end, name))
    data = size - 8 - n
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position or end < begin:
            raise bad(f"tensor {name!r}'s bytes {begin}..{end} do not follow the previous tensor's end {position}")
        position = end
    if position != data:
        raise bad(f"the tensors need {position} bytes of data but the file holds {data}"
                  + (" (truncated)" if position > data else ""))
    return SafetensorsHeader(path, dict(metadata), header)

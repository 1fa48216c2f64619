"""The CLIP BPE tokenizer, built offline from the merges that open_clip ships.

SD1.5's tokenizer is OpenAI CLIP's byte-level BPE (49,408 tokens, 77 positions). The hub copy cannot be
downloaded here, but open_clip bundles the same merge table; writing ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` from it gives a transformers ``CLIPTokenizer`` whose ids equal open_clip's.
transformers 5 can silently return an empty-vocabulary tokenizer for a bad source, so every load is checked.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

from .files import atomic_write_text

log = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _byte_symbols() -> list[str]:
    """Printable stand-ins of the 256 bytes in CLIP's vocabulary order: printable bytes as themselves, then
    the remaining bytes mapped to code points from 256 upwards (the GPT-2 / CLIP byte-level convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def open_clip_merges_path() -> Path:
    """Location of open_clip's bundled BPE merge table."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip is a dependency
        raise ImportError("building the CLIP tokenizer needs open_clip_torch: pip install open_clip_torch") from e
    path = Path(os.path.dirname(open_clip.__file__)) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's merge table is missing: {path}; reinstall open_clip_torch")
    return path


def write_clip_tokenizer(folder: str | os.PathLike, pad_token: str = EOS) -> Path:
    """Write a transformers CLIPTokenizer folder built from open_clip's merges; returns the folder.

    ``pad_token`` is ``<|endoftext|>`` for SD1.5's tokenizer and ``!`` for SDXL's second tokenizer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_merges_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built {len(tokens)} CLIP tokens, expected {CLIP_VOCAB_SIZE}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    log.info("wrote CLIP tokenizer (%d tokens) to %s", len(tokens), folder)
    return folder


def load_clip_tokenizer(folder: str | os.PathLike):
    """Load a CLIPTokenizer from a local folder and check it is the full CLIP vocabulary."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CLIP tokenizer files {missing} not found in {folder}; "
            "write them offline with shortft_core.tokenizer.write_clip_tokenizer(folder)"
        )
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.vocab_size != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"the tokenizer in {folder} has {tok.vocab_size} tokens, expected {CLIP_VOCAB_SIZE}: "
            "its files are damaged; rewrite them with write_clip_tokenizer"
        )
    return tok

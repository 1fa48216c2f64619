"""``python -m shortft_core export``: re-write a LoRA file, or a whole LoRA set folder, in another key layout
(kohya <-> diffusers).

The file is checked against the base architecture (every key must map onto a UNet layer with the right shape),
which needs only the UNet's config: the UNet is built on the meta device, no weights are read.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("shortft_core")

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="convert a LoRA file or set between the kohya and diffusers layouts",
                       description="Read a LoRA file in any supported layout (kohya / kohya-sgm / diffusers / "
                                   "peft), check every key against the base UNet architecture and write it in the "
                                   "kohya layout (ComfyUI LoraLoader, A1111) or the diffusers layout "
                                   "(pipe.load_lora_weights). Metadata from ShortFT is carried over. Given a LoRA "
                                   "set folder (a run's lora/), every segment file and the merged file are "
                                   "converted into the --out folder with the set's set.json.")
    p.add_argument("--lora", required=True, help="input LoRA file (.safetensors) or LoRA set folder (with set.json)")
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for a LoRA set)")
    p.add_argument("--layout", choices=["kohya", "diffusers"], default="kohya", help="output layout (default kohya)")
    p.add_argument("--base", default=None,
                   help="base architecture: sd15, sdxl, tiny or a diffusers folder (default: the family stored "
                        "in a ShortFT file's metadata)")
    p.add_argument("--dtype", choices=list(_DTYPES), default=None, help="output dtype (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_export)


def _unet_config(base: str) -> dict:
    from ..families import FAMILIES, bundled_config

    if base in FAMILIES:
        return bundled_config(base, "unet")
    if base == "tiny":
        from ..tiny_world import weights_dir

        path = weights_dir() / "pipeline"
    else:
        path = Path(base).expanduser()
    cfg = path / "unet" / "config.json"
    if not cfg.is_file():
        raise SystemExit(f"--base {base}: expected sd15, sdxl, tiny or a diffusers folder with unet/config.json "
                         f"({cfg} not found)")
    return json.loads(cfg.read_text(encoding="utf-8"))


def run_export(args: argparse.Namespace) -> int:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from ..lora_io import LoraFormatError, convert_lora_file, lora_metadata
    from ..lora_set import SET_MANIFEST, convert_lora_set, read_set_manifest, set_files

    src, dst = Path(args.lora).expanduser(), Path(args.out).expanduser()
    is_set = src.is_dir()
    if is_set and not (src / SET_MANIFEST).is_file():
        raise SystemExit(f"--lora {src} is a folder without {SET_MANIFEST}: pass a LoRA file, or a run's lora/ folder")
    if not is_set and not src.is_file():
        raise SystemExit(f"--lora {src}: no such file")
    if is_set and dst.is_file():
        raise SystemExit(f"--out {dst} is a file; a LoRA set is written into a folder")
    if not is_set and dst.exists() and not args.overwrite:
        raise SystemExit(f"--out {dst} exists; choose another path or pass --overwrite")
    # every input file's safetensors header is checked before the UNet is built or anything is written
    if is_set:
        set_files(src)
        stored = read_set_manifest(src).get("family")
    else:
        stored = lora_metadata(src, "--lora").get("shortft_family")
    base = args.base or stored
    if not base or base == "custom":
        raise SystemExit("--base is required (sd15, sdxl, tiny or a diffusers folder): the file does not say which "
                         "model it belongs to")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_unet_config(base))
    convert = convert_lora_set if is_set else convert_lora_file
    try:
        convert(src, dst, unet, layout=args.layout, overwrite=args.overwrite,
                dtype=_DTYPES[args.dtype] if args.dtype else None)
    except LoraFormatError as e:
        raise SystemExit(f"--lora {src}: {e}") from e
    log.info("wrote %s (%s layout%s)", dst, args.layout, ", LoRA set" if is_set else "")
    return 0

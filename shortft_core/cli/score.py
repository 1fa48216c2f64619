"""``python -m shortft_core score``: score a folder of images with any reward or weighted combination.

    python -m shortft_core score --reward "10*pickscore + 2*hps_v2" --weights-dir ~/models/reward_models \\
        --images out/ --prompts prompts.txt --out scores.json

``--reward`` takes the weighted spec every command accepts (``[weight*]name`` terms joined by ``+``, see
``rewards.registry``).

Prompts: a text file with one prompt per image (images in file-name order), or the ``samples.json`` that
``shortft sample`` writes (used automatically when ``--prompts`` is omitted and the folder holds one).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger("shortft_core.score")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_score_parser(sub) -> None:
    from .common import add_threads_flag, number
    from ..rewards.registry import SPEC_EXAMPLE, describe_rewards

    p = sub.add_parser("score", help="score images with reward models (HPS v2, PickScore, ImageReward, ...)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score every image in a folder against its prompt with one reward or a weighted "
                                   "sum; each term is reported separately. Weights are read from local files only.",
                       epilog="rewards:\n" + describe_rewards() + f"\n\nexample:\n  shortft score --reward "
                              f"\"{SPEC_EXAMPLE}\" --weights-dir models/reward_models --images out/ "
                              "--prompts prompts.txt")
    p.add_argument("--reward", nargs="+", required=True, metavar="SPEC",
                   help="a reward or preset name, or a weighted sum of them, the same spec train takes, e.g. "
                        f"'{SPEC_EXAMPLE}' (weight 1 when omitted; the words after --reward are read as one spec)")
    p.add_argument("--images", required=True, help="folder of images (png, jpg, webp), scored in file-name order")
    p.add_argument("--prompts", help="text file with one prompt per image, or a samples.json from `shortft sample` "
                                     "(default: IMAGES/samples.json when present)")
    p.add_argument("--weights-dir", help="folder holding the reward weights under their published names "
                                         "(e.g. HPS_v2_compressed.pt, PickScore_v1/)")
    p.add_argument("--path", action="append", default=[], metavar="NAME[.SLOT]=PATH",
                   help="a reward's weight file or folder, e.g. hps_v2=/m/HPS_v2_compressed.pt, "
                        "aesthetic.clip=/m/clip-vit-large-patch14 (repeatable)")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a reward's builder option, e.g. hps_v2.arch=ViT-H-14, compressibility.quality=75")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="reward model precision (default bf16 on CUDA, fp32 on CPU)")
    add_threads_flag(p)
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="images per forward pass (same-size images only)")
    p.add_argument("--out", help="write per-image and mean scores to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run_score)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SystemExit(f"{flag} {item!r}: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _options(items: list[str]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for key, value in _pairs(items, "--option").items():
        name, dot, opt = key.rpartition(".")
        if not dot:
            raise SystemExit(f"--option {key}={value}: write NAME.KEY=VALUE, e.g. compressibility.quality=75")
        try:
            parsed: object = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[opt] = parsed
    return out


def _images_and_prompts(folder: Path, prompts_file: str | None) -> tuple[list[Path], list[str]]:
    from .common import read_prompts

    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: no such folder")
    samples = folder / "samples.json"
    if prompts_file is None and samples.is_file():
        prompts_file = str(samples)
    if prompts_file is not None and prompts_file.endswith(".json"):
        data = json.loads(Path(prompts_file).read_text(encoding="utf-8"))
        entries = data.get("images", []) if isinstance(data, dict) else []
        if not entries or not all("file" in e and "prompt" in e for e in entries):
            raise SystemExit(f"--prompts {prompts_file}: expected a samples.json with images: [{{file, prompt}}]")
        files = [folder / e["file"] for e in entries]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"--prompts {prompts_file} lists {missing[0]} (and {len(missing) - 1} more), not found")
        return files, [e["prompt"] for e in entries]
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.name != "grid.png")
    if not files:
        raise SystemExit(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if prompts_file is None:
        return files, [""] * len(files)  # prompt-free rewards (symmetry, aesthetic, ...) need none
    prompts = read_prompts(None, prompts_file, None)
    if len(prompts) != len(files):
        raise SystemExit(f"--prompts {prompts_file} has {len(prompts)} prompts but {folder} has {len(files)} images; "
                         "give one prompt per image, in file-name order")
    return files, prompts


def _load_image(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0


def run_score(args: argparse.Namespace) -> int:
    from .common import DTYPES, device as device_flag, set_threads
    from ..files import atomic_write_json, refuse_overwrite
    from ..rewards.registry import build_reward_spec, parse_reward_spec

    if args.out:
        try:
            refuse_overwrite(args.out, args.overwrite, "--out")
        except FileExistsError as e:
            raise SystemExit(str(e)) from None
    spec = " ".join(args.reward)
    try:
        parse_reward_spec(spec)  # refuse a bad spec before reading images or weights
    except ValueError as e:
        raise ValueError(f"--reward: {e}") from e
    files, prompts = _images_and_prompts(Path(args.images), args.prompts)
    set_threads(args.threads)
    device = device_flag(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    combo = build_reward_spec(spec, paths=_pairs(args.path, "--path"), weights_dir=args.weights_dir,
                              device=device, dtype=dtype, options=_options(args.option))
    per_term: dict[str, list[float]] = {label: [] for label in combo.labels}
    totals: list[float] = []
    i = 0
    with torch.no_grad():
        while i < len(files):
            first = _load_image(files[i])
            batch, j = [first], i + 1
            while j < len(files) and len(batch) < args.batch_size:
                img = _load_image(files[j])
                if img.shape != first.shape:
                    break
                batch.append(img)
                j += 1
            total = combo(torch.cat(batch), prompts[i:j])
            totals += total.tolist()
            for label, values in combo.last_terms.items():
                per_term[label] += values.tolist()
            i = j
    summary = {}
    for label, weight, r in zip(combo.labels, combo.weights, combo.rewards):
        values = per_term[label]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        summary[label] = {"weight": weight, "mean": mean, "std": std, "report_scale": r.report_scale,
                          "mean_reported": mean * r.report_scale}
        printed = f"  (papers print it x{r.report_scale:g}: {mean * r.report_scale:.3f})" if r.report_scale != 1 else ""
        log.info("%-16s mean %.5f  std %.5f  weight %g%s", label, mean, std, weight, printed)
    combined_mean = sum(totals) / len(totals)
    log.info("%-16s mean %.5f over %d images (%s)", "combined", combined_mean, len(totals), combo.name)
    result = {
        "spec": combo.name, "device": str(device), "dtype": str(dtype) if dtype else "default",
        "rewards": summary, "combined_mean": combined_mean,
        "images": [{"file": str(f), "prompt": p, "combined": t, "scores": {k: per_term[k][n] for k in per_term}}
                   for n, (f, p, t) in enumerate(zip(files, prompts, totals))],
    }
    if args.out:
        atomic_write_json(args.out, result)
        log.info("wrote %s", args.out)
    return 0

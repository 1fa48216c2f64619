"""Procedural scenes of the tiny world: coloured shapes on plain backgrounds, with captions.

Every scene is drawn from its own seeded random stream, so ``make_scene(seed, i)`` is the same on every
machine whatever batch it is drawn in. A fixed set of colour-shape pairs (``HELD_OUT_PAIRS``) never occurs
in the training split; the held-out split contains at least one of them, so evaluation measures whether a
model composes attributes it has seen only separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 185),
    "orange": (245, 130, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, str] = {  # position word -> phrase used in captions
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "diamond"),
        ("blue", "circle"),
        ("yellow", "square"),
        ("purple", "triangle"),
        ("orange", "diamond"),
    }
)

Split = Literal["train", "held_out", "any"]

_RADIUS = {"small": 4.5, "large": 8.5, "pair": 5.5}  # in output pixels
_CENTRES = {"left": (8.5, 16.0), "right": (23.5, 16.0), "top": (16.0, 8.5), "bottom": (16.0, 23.5), "center": (16.0, 16.0)}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene."""

    colour: str
    shape: str

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Attributes of a scene; the caption and the picture are both functions of it (plus layout jitter)."""

    objects: tuple[SceneObject, ...]
    background: str
    size: str | None = None  # one-object scenes
    position: str | None = None  # one-object scenes
    relation: str | None = None  # two-object scenes: objects[0] <relation> objects[1]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {sorted(BACKGROUNDS)}")
        for obj in self.objects:
            if obj.colour not in COLOURS or obj.shape not in SHAPES:
                raise ValueError(f"unknown object {obj}; colours {sorted(COLOURS)}, shapes {list(SHAPES)}")
        if len(self.objects) == 1:
            if self.size not in SIZES or self.position not in POSITIONS or self.relation is not None:
                raise ValueError("a one-object scene needs a size and a position and no relation")
        elif len(self.objects) == 2:
            if self.relation not in RELATIONS or self.size is not None or self.position is not None:
                raise ValueError("a two-object scene needs a relation and no size or position")
            if self.objects[0] == self.objects[1]:
                raise ValueError("the two objects of a scene must differ in colour or shape")
        else:
            raise ValueError("a scene has one or two objects")

    @property
    def is_held_out(self) -> bool:
        return any(o.pair in HELD_OUT_PAIRS for o in self.objects)

    @property
    def caption(self) -> str:
        return caption(self)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The canonical English caption of a scene."""
    bg = f"on a {scene.background} background"
    if len(scene.objects) == 1:
        o = scene.objects[0]
        return f"a {scene.size} {o.colour} {o.shape} {POSITIONS[scene.position]} {bg}"
    a, b = scene.objects
    return f"{_article(a.colour)} {a.colour} {a.shape} {scene.relation} {_article(b.colour)} {b.colour} {b.shape} {bg}"


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_ONE_RE = re.compile(
    rf"^a (?P<size>{'|'.join(SIZES)}) (?P<c>{_COLOUR_RE}) (?P<s>{_SHAPE_RE}) "
    rf"(?P<pos>{'|'.join(POSITIONS.values())}) on a (?P<bg>{'|'.join(BACKGROUNDS)}) background$"
)
_TWO_RE = re.compile(
    rf"^an? (?P<c1>{_COLOUR_RE}) (?P<s1>{_SHAPE_RE}) (?P<rel>{'|'.join(RELATIONS)}) "
    rf"an? (?P<c2>{_COLOUR_RE}) (?P<s2>{_SHAPE_RE}) on a (?P<bg>{'|'.join(BACKGROUNDS)}) background$"
)


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption`; raises ``ValueError`` for text outside the tiny world's grammar."""
    text = " ".join(text.strip().lower().split())
    if m := _ONE_RE.match(text):
        pos = next(k for k, v in POSITIONS.items() if v == m["pos"])
        return Scene((SceneObject(m["c"], m["s"]),), m["bg"], size=m["size"], position=pos)
    if m := _TWO_RE.match(text):
        return Scene((SceneObject(m["c1"], m["s1"]), SceneObject(m["c2"], m["s2"])), m["bg"], relation=m["rel"])
    raise ValueError(f"not a tiny-world caption: {text!r}")


def is_held_out(prompt: str) -> bool:
    """True when ``prompt`` is a tiny-world caption naming a held-out colour-shape pair (``HELD_OUT_PAIRS``, never
    drawn in training); False for other captions and for text outside the caption grammar, which names no pair."""
    try:
        return parse_caption(prompt).is_held_out
    except ValueError:
        return False


def _random_scene(rng: np.random.Generator) -> Scene:
    bg = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.5:
        obj = SceneObject(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        return Scene((obj,), bg, size=str(rng.choice(SIZES)), position=str(rng.choice(list(POSITIONS))))
    while True:
        a = SceneObject(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        b = SceneObject(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if a != b:
            return Scene((a, b), bg, relation=str(rng.choice(RELATIONS)))


def _in_split(scene: Scene, split: Split) -> bool:
    return split == "any" or (split == "held_out") == scene.is_held_out


def _split_stream(split: Split) -> int:
    return {"train": 0, "held_out": 1, "any": 2}[split]


def sample_scene(seed: int, index: int, split: Split = "train") -> Scene:
    """The ``index``-th scene of a split for a seed (rejection-sampled from its own random stream)."""
    rng = np.random.default_rng([seed, _split_stream(split), index, 0])
    while True:
        scene = _random_scene(rng)
        if _in_split(scene, split):
            return scene


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Centre x, centre y and radius (output pixels) of each object, with a little jitter."""
    if len(scene.objects) == 1:
        cx, cy = _CENTRES[scene.position]
        r = _RADIUS[scene.size] * rng.uniform(0.9, 1.1)
        return [(cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5), r)]
    r1, r2 = (_RADIUS["pair"] * rng.uniform(0.9, 1.1) for _ in range(2))
    first, second = rng.uniform(6.5, 10.0), rng.uniform(22.0, 25.5)  # along the relation axis
    across1, across2 = rng.uniform(11.0, 21.0), rng.uniform(11.0, 21.0)
    if scene.relation in ("right of", "below"):
        first, second = second, first
    if scene.relation in ("left of", "right of"):
        return [(first, across1, r1), (second, across2, r2)]
    return [(across1, first, r1), (across2, second, r2)]


def _coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape, by supersampling ``ss`` x ``ss`` per pixel."""
    coords = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":
        h = 0.85 * r
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= 1.15 * r
    elif shape == "triangle":  # upright, centred on its centroid
        h = 1.2 * r
        top, base = -h, 0.6 * h
        half_width = (y - top) / (base - top) * (1.25 * r)
        inside = (y >= top) & (y <= base) & (np.abs(x) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(scene: Scene, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene to an (H, W, 3) uint8 image; ``seed`` drives the layout and colour jitter."""
    rng = np.random.default_rng([seed, 7])
    scale = size / IMAGE_SIZE
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64) + rng.uniform(-8, 8)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    for obj, (cx, cy, r) in zip(scene.objects, _layout(scene, rng)):
        colour = np.array(COLOURS[obj.colour], dtype=np.float64) + rng.uniform(-12, 12, size=3)
        alpha = _coverage(obj.shape, cx * scale, cy * scale, r * scale, size, SUPERSAMPLE)[..., None]
        img = img * (1 - alpha) + colour * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_scene(seed: int, index: int, split: Split = "train") -> tuple[np.ndarray, Scene]:
    """Image and attributes of the ``index``-th scene of a split."""
    scene = sample_scene(seed, index, split)
    return render(scene, seed=hash_seed(seed, _split_stream(split), index)), scene


def hash_seed(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers (stable across processes, unlike ``hash``)."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


def scene_batch(seed: int, indices: Iterable[int], split: Split = "train") -> tuple[np.ndarray, list[Scene]]:
    """A stacked (N, H, W, 3) uint8 batch and its scenes."""
    pairs = [make_scene(seed, i, split) for i in indices]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def distinct_prompts(n: int, seed: int = 0, split: Split = "held_out") -> list[str]:
    """``n`` distinct captions of a split, fixed for a seed."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        c = sample_scene(seed, i, split).caption
        if c not in out:
            out.append(c)
        i += 1
        if i > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} prompts")
    return out


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions of held-out compositions (the evaluation prompts)."""
    return distinct_prompts(n, seed, "held_out")


def train_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions of the training split."""
    return distinct_prompts(n, seed, "train")


def variants(scene: Scene, attribute: str) -> list[Scene]:
    """Scenes equal to ``scene`` except for one attribute (the alternatives of a caption-picking test).

    ``attribute`` is ``colour``, ``shape`` (both change the first object), ``position`` (the position of a
    one-object scene, or the relation of a two-object scene) or ``background``.
    """
    out: list[Scene] = []
    first, rest = scene.objects[0], scene.objects[1:]

    def build(**kw) -> None:
        try:
            s = Scene(**{"objects": scene.objects, "background": scene.background, "size": scene.size,
                         "position": scene.position, "relation": scene.relation, **kw})
        except ValueError:
            return
        if s != scene:
            out.append(s)

    if attribute == "colour":
        for c in COLOURS:
            build(objects=(SceneObject(c, first.shape),) + rest)
    elif attribute == "shape":
        for s in SHAPES:
            build(objects=(SceneObject(first.colour, s),) + rest)
    elif attribute == "position":
        if len(scene.objects) == 1:
            for p in POSITIONS:
                build(position=p)
        else:
            for r in RELATIONS:
                build(relation=r)
    elif attribute == "background":
        for b in BACKGROUNDS:
            build(background=b)
    else:
        raise ValueError(f"unknown attribute {attribute!r}; use colour, shape, position or background")
    return out


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce."""
    words: set[str] = set()
    for part in ("a an on background the in at of", *COLOURS, *SHAPES, *BACKGROUNDS, *SIZES,
                 *POSITIONS.values(), *RELATIONS):
        words.update(part.split())
    return sorted(words)


def to_float(images: np.ndarray | Sequence[np.ndarray]):
    """uint8 (N, H, W, 3) -> float32 torch tensor (N, 3, H, W) in [0, 1]."""
    import torch

    arr = np.asarray(images)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)

"""Chain plans: every method is an ordered list of steps over the timestep grid.

A :class:`Step` goes from timestep ``t`` to ``s`` with one network call: the fine-tuned model (an adapter set),
the frozen shortcut, or the bare base. It says whether the network call carries gradient, whether it is
recomputed in backward (checkpointing), whether the denoiser sees a stop-gradient input (DRTune), and whether
its result is read out for the reward. The DDIM update itself is always differentiable, so a step without
gradient still passes the gradient of later steps along its linear skip path if its input carries one; the graph
simply starts at the first step that has gradient (truncation falls out of that).

ShortFT, DRaFT-K, DRaFT-LV, AlignProp, ReFL, full BPTT and DRTune are builders below; random choices (AlignProp's
K, ReFL's step, DRTune's offsets) take a ``torch.Generator`` so a run is reproducible. Plans print as tables and
serialise to JSON for run metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch

from .adapters import SHORTCUT_ADAPTER, LoraSetSpec
from .schedule import FINAL, leading_grid

TUNED, SHORTCUT_NET, BASE = "tuned", "shortcut", "base"


@dataclass(frozen=True)
class Step:
    """One network call and DDIM jump ``t -> s`` (``s = FINAL`` is the clean end), or a re-noising."""

    t: int
    s: int
    net: str = TUNED  # tuned | shortcut | base
    adapters: tuple[str, ...] = ()
    guidance: float = 1.0
    grad: bool = False
    checkpoint: bool = False
    detach_input: bool = False
    kind: str = "ddim"  # ddim | renoise (forward-noise from level t up to level s; no network)
    readout: str | None = None  # None | "x" (this step's output) | "x0" (this step's predicted clean sample)
    segment: int = 0

    @property
    def calls_network(self) -> bool:
        return self.kind == "ddim"


@dataclass(frozen=True)
class ChainPlan:
    """A method's chain for one iteration."""

    method: str
    steps: tuple[Step, ...]
    stage: int | None = None
    info: dict = field(default_factory=dict, compare=False)
    trains: tuple[str, ...] | None = None  # adapters the optimizer updates while this plan runs (None: derived)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a plan needs at least one step")
        if not any(st.readout for st in self.steps):
            raise ValueError(f"plan {self.method!r} has no readout step")

    @property
    def network_calls(self) -> int:
        return sum(st.calls_network for st in self.steps)

    @property
    def grad_calls(self) -> int:
        return sum(st.calls_network and st.grad for st in self.steps)

    @property
    def needs_uncond(self) -> bool:
        """Whether any step is guided, so the chain needs the unconditional embedding (tuned steps may run
        unguided while a shortcut runs guided, as it was distilled)."""
        return any(st.guidance != 1.0 for st in self.steps)

    def trainable_adapters(self) -> set[str]:
        """What the optimizer updates while this plan runs: the builder's ``trains`` (ShortFT stage i trains
        align_i..align_k although the stacked align_1.. also carry gradient), else every adapter of a tuned step
        with gradient."""
        if self.trains is not None:
            return set(self.trains)
        return {a for st in self.steps if st.grad and st.net == TUNED for a in st.adapters}

    def describe(self) -> str:
        """A readable table, one line per step, consecutive alike steps folded."""
        lines = [f"plan {self.method}" + (f" (stage {self.stage})" if self.stage else "")
                 + f": {self.network_calls} network calls, {self.grad_calls} with gradient"]
        rows: list[list] = []
        for st in self.steps:
            key = (st.kind, st.net, st.adapters, st.guidance, st.grad, st.checkpoint, st.detach_input, st.readout)
            if rows and rows[-1][0] == key and rows[-1][2] == st.t and st.readout is None:
                rows[-1][2] = st.s
                rows[-1][3] += 1
            else:
                rows.append([key, st.t, st.s, 1])
        for key, t, s, n in rows:
            kind, net, adapters, g, grad, ck, det, ro = key
            end = "x0" if s == FINAL else str(s)
            what = "renoise" if kind == "renoise" else f"{net}[{','.join(adapters)}]" if adapters else net
            flags = ",".join(f for f, on in (("grad", grad), ("ckpt", ck), ("sg-input", det)) if on) or "no-grad"
            tail = f" -> readout {ro}" if ro else ""
            lines.append(f"  {t:>4} -> {end:>4}  {n:>2} step{'s' if n > 1 else ' '}  {what:<28} cfg {g:<4g} {flags}{tail}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"method": self.method, "stage": self.stage, "info": self.info,
                "trains": None if self.trains is None else list(self.trains),
                "steps": [asdict(st) for st in self.steps]}


# ----- helpers ---------------------------------------------------------------------------------------------------
def _chain(grid: Sequence[int]) -> list[tuple[int, int]]:
    g = list(grid)
    if any(a <= b for a, b in zip(g, g[1:])):
        raise ValueError(f"timestep grid must be strictly decreasing, got {g[:6]}...")
    return [(t, g[i + 1] if i + 1 < len(g) else FINAL) for i, t in enumerate(g)]


def _tuned(t: int, s: int, lora: LoraSetSpec, guidance: float, **kw) -> Step:
    """The fine-tuned model's step: its segment's adapter set, or the bare base where the set has none."""
    seg = lora.segments.segment_of(t)
    active = lora.active_in_segment(seg)
    return Step(t, s, TUNED if active else BASE, active, guidance, segment=seg, **kw)


def _mark_last_readout(steps: list[Step]) -> list[Step]:
    steps[-1] = replace(steps[-1], readout="x")
    return steps


def base_chain(grid: Sequence[int], guidance: float) -> ChainPlan:
    """Plain DDIM sampling of the base model (no adapters, no gradient) over ``grid``."""
    return ChainPlan("base", tuple(_mark_last_readout([Step(t, s, BASE, (), guidance) for t, s in _chain(grid)])))


def adapter_chain(adapters: Sequence[str], guidance: float, grid: Sequence[int], method: str = "lora") -> ChainPlan:
    """Every grid step by the base with the same ``adapters`` active (e.g. one LoRA at every timestep), no gradient."""
    steps = [Step(t, s, TUNED, tuple(adapters), guidance) for t, s in _chain(grid)]
    return ChainPlan(method, tuple(_mark_last_readout(steps)))


def original_chain(lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None) -> ChainPlan:
    """The inference chain: every grid step by the fine-tuned model with its segment's adapter set, no gradient."""
    grid = list(grid or leading_grid(50))
    return ChainPlan("sample", tuple(_mark_last_readout([_tuned(t, s, lora, guidance) for t, s in _chain(grid)])))


# ----- ShortFT ---------------------------------------------------------------------------------------------------
def shortft_plan(stage: int, lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None,
                 real_grad_steps: int | None = 1, shortcut_guidance: float = 1.0, checkpoint: bool = False,
                 shortcut_net: str = SHORTCUT_NET, last_anchor: str = "end") -> ChainPlan:
    """ShortFT stage ``stage`` of k (k = number of segments of ``lora.segments``).

    Segments before ``stage`` run the original chain without gradient (already trained); segment ``stage`` runs the
    original chain, with gradient on its last ``real_grad_steps`` steps (None: all of them); each later segment is
    one frozen shortcut jump from its first grid point to its last (its anchor: 741 -> 501 on SD1.5's 50-step grid)
    followed by one fine-tuned step from the anchor, both with gradient. ``shortcut_net='base'`` replaces the
    shortcut by naive one-step DDIM jumps of the base (ablation); ``'tuned'`` jumps with the fine-tuned model.
    ``last_anchor='start'`` moves the last segment's fine-tuned step to its first grid step (241 -> 221), followed
    by the jump to the clean end, instead of the jump followed by the very last step (1 -> x0), which barely changes
    the image (BENCHMARKS.md, "The dip, isolated"). A set whose last segment is left to the base
    (``lora.last_segment == 'base'``) has one stage less, and its anchor steps there are base steps.
    """
    if last_anchor not in ("end", "start"):
        raise ValueError(f"last_anchor must be 'end' or 'start', got {last_anchor!r}")
    segs = lora.segments
    k = segs.k
    if not 1 <= stage <= lora.tuned_segments:
        raise ValueError(f"stage must be in 1..{lora.tuned_segments}, got {stage}")
    grid = list(grid or leading_grid(50))
    by_seg: dict[int, list[tuple[int, int]]] = {}
    for t, s in _chain(grid):
        by_seg.setdefault(segs.segment_of(t), []).append((t, s))
    if sorted(by_seg) != list(range(1, k + 1)):
        raise ValueError(f"every segment needs at least one grid step; the grid covers segments {sorted(by_seg)}")
    steps: list[Step] = []
    for j in range(1, k + 1):
        pairs = by_seg[j]
        if j < stage:
            steps += [_tuned(t, s, lora, guidance) for t, s in pairs]
        elif j == stage:
            n = len(pairs)
            first_grad = 0 if real_grad_steps is None else max(0, n - real_grad_steps)
            steps += [_tuned(t, s, lora, guidance, grad=i >= first_grad, checkpoint=checkpoint and i >= first_grad)
                      for i, (t, s) in enumerate(pairs)]
        elif j == k and last_anchor == "start" and len(pairs) > 1:
            t_first, t_next = pairs[0]
            steps.append(_tuned(t_first, t_next, lora, guidance, grad=True, checkpoint=checkpoint))
            steps.append(_jump(t_next, pairs[-1][1], j, lora, guidance, shortcut_guidance, checkpoint, shortcut_net))
        else:
            t_first, anchor = pairs[0][0], pairs[-1][0]
            if anchor != t_first:  # a one-step segment has nothing to jump over
                steps.append(_jump(t_first, anchor, j, lora, guidance, shortcut_guidance, checkpoint, shortcut_net))
            steps.append(_tuned(anchor, pairs[-1][1], lora, guidance, grad=True, checkpoint=checkpoint))
    info = {"real_grad_steps": real_grad_steps, "shortcut_net": shortcut_net, "segments": list(segs.lowers),
            "last_anchor": last_anchor}
    return ChainPlan("shortft", tuple(_mark_last_readout(steps)), stage, info, lora.trainable_in_stage(stage))


def stage_chain(stage: int, lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None,
                anchors: bool = True) -> ChainPlan:
    """The inference chain of a set part-way through ShortFT stage ``stage``: the stacked set on segments up to
    ``stage`` (the ones training has run for real), the bare base on later segments, except (``anchors``) the last
    step of each later segment, where training runs the tuned model after its shortcut jump. After stage k it is the
    full inference chain. No gradient; for evaluating partial runs without the untrained low-noise steps."""
    segs = lora.segments
    if not 1 <= stage <= lora.tuned_segments:
        raise ValueError(f"stage must be in 1..{lora.tuned_segments}, got {stage}")
    pairs = _chain(grid or leading_grid(50))
    last_of = {segs.segment_of(t): t for t, _ in pairs}  # the anchor: each segment's last grid step
    steps = []
    for t, s in pairs:
        j = segs.segment_of(t)
        if j <= stage or (anchors and t == last_of[j]):
            steps.append(_tuned(t, s, lora, guidance))
        else:
            steps.append(Step(t, s, BASE, (), guidance, segment=j))
    name = "stage-chain" if anchors else "stage-chain-no-anchors"
    return ChainPlan(name, tuple(_mark_last_readout(steps)), stage, {"anchors": anchors}, trains=())


def _jump(t: int, s: int, segment: int, lora: LoraSetSpec, guidance: float, shortcut_guidance: float,
          checkpoint: bool, shortcut_net: str) -> Step:
    """One jump over a stretch of a later segment: the frozen shortcut, a naive base step, or the tuned model."""
    if shortcut_net == SHORTCUT_NET:
        return Step(t, s, SHORTCUT_NET, (SHORTCUT_ADAPTER,), shortcut_guidance, grad=True, checkpoint=checkpoint,
                    segment=segment)
    if shortcut_net == BASE:
        return Step(t, s, BASE, (), guidance, grad=True, checkpoint=checkpoint, segment=segment)
    if shortcut_net == TUNED:
        return _tuned(t, s, lora, guidance, grad=True, checkpoint=checkpoint)
    raise ValueError(f"shortcut_net must be shortcut, base or tuned; got {shortcut_net!r}")


def shortcut_model_plan(lora: LoraSetSpec, edges: Sequence[int] = (999, 749, 499, 249), grad: bool = True,
                        guidance: float = 1.0) -> ChainPlan:
    """Ablation "fine-tune the shortcut model instead of the base": the few-step shortcut chain (at the CFG the
    shortcut was made for) with the alignment adapter stacked on the shortcut at every step, gradient through all."""
    e = list(edges)
    pairs = [(t, e[i + 1] if i + 1 < len(e) else FINAL) for i, t in enumerate(e)]
    steps = [Step(t, s, SHORTCUT_NET, (SHORTCUT_ADAPTER, *lora.names[:1]), guidance, grad=grad, segment=1) for t, s in pairs]
    return ChainPlan("shortcut-model", tuple(_mark_last_readout(steps)), trains=lora.names[:1] if grad else ())


def shortcut_preview_plan(lora: LoraSetSpec, edges: Sequence[int] = (999, 749, 499, 249),
                          guidance: float = 1.0) -> ChainPlan:
    """A cheap look at the aligned model during training: the shortcut's few-step chain (at its own CFG) with the
    alignment set of each jump's starting segment stacked on the shortcut, no gradient. An approximation of the
    full inference chain at a few network calls instead of 50."""
    e = list(edges)
    pairs = [(t, e[i + 1] if i + 1 < len(e) else FINAL) for i, t in enumerate(e)]
    steps = [Step(t, s, SHORTCUT_NET, (SHORTCUT_ADAPTER, *lora.active_at(t)), guidance, segment=lora.segments.segment_of(t))
             for t, s in pairs]
    return ChainPlan("shortcut-preview", tuple(_mark_last_readout(steps)), trains=())


# ----- baselines -------------------------------------------------------------------------------------------------
def draft_plan(k: int, lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None,
               checkpoint: bool = False) -> ChainPlan:
    """DRaFT-K: gradient through the last K sampling steps only."""
    pairs = _chain(grid or leading_grid(50))
    if not 1 <= k <= len(pairs):
        raise ValueError(f"DRaFT K must be in 1..{len(pairs)}, got {k}")
    first = len(pairs) - k
    steps = [_tuned(t, s, lora, guidance, grad=i >= first, checkpoint=checkpoint and i >= first)
             for i, (t, s) in enumerate(pairs)]
    return ChainPlan(f"draft-{k}", tuple(_mark_last_readout(steps)), info={"k": k}, trains=lora.names)


def draft_lv_plan(n: int, lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None) -> ChainPlan:
    """DRaFT-LV: the chain without gradient, then n times: re-noise the result to the last grid step and take
    that step with gradient (n readouts, averaged by the trainer)."""
    if n < 1:
        raise ValueError(f"DRaFT-LV needs n >= 1, got {n}")
    pairs = _chain(grid or leading_grid(50))
    steps = [_tuned(t, s, lora, guidance) for t, s in pairs]
    t_last = pairs[-1][0]
    for _ in range(n):
        steps.append(Step(FINAL, t_last, kind="renoise"))
        steps.append(_tuned(t_last, FINAL, lora, guidance, grad=True, readout="x"))
    return ChainPlan("draft-lv", tuple(steps), info={"n": n}, trains=lora.names)


def alignprop_plan(gen: torch.Generator, lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None,
                   k_mean: float = 8.0, k_std: float = 2.0, k: int | None = None) -> ChainPlan:
    """AlignProp: every step checkpointed; gradient kept for the last K steps, K drawn per batch (rounded normal)."""
    pairs = _chain(grid or leading_grid(50))
    if k is None:
        k = int(round(k_mean + k_std * float(torch.randn((), generator=gen))))
    k = max(1, min(len(pairs), k))
    first = len(pairs) - k
    steps = [_tuned(t, s, lora, guidance, grad=i >= first, checkpoint=i >= first) for i, (t, s) in enumerate(pairs)]
    return ChainPlan("alignprop", tuple(_mark_last_readout(steps)), info={"k": k}, trains=lora.names)


def refl_plan(gen: torch.Generator, lora: LoraSetSpec, guidance: float, total: int = 40,
              window: tuple[int, int] = (30, 39)) -> ChainPlan:
    """ReFL: sample without gradient to a random step in ``window`` of ``total``, take it with gradient, and read
    out that step's predicted clean sample (early exit)."""
    pairs = _chain(leading_grid(total))
    lo, hi = window
    if not 0 <= lo <= hi < total:
        raise ValueError(f"ReFL window must lie in 0..{total - 1}, got {window}")
    idx = int(torch.randint(lo, hi + 1, (), generator=gen))
    steps = [_tuned(t, s, lora, guidance) for t, s in pairs[:idx]]
    t, s = pairs[idx]
    steps.append(_tuned(t, s, lora, guidance, grad=True, readout="x0"))
    return ChainPlan("refl", tuple(steps), info={"step": idx, "total": total}, trains=lora.names)


def full_bptt_plan(lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None,
                   checkpoint: bool = True) -> ChainPlan:
    """Gradient through every sampling step (checkpointed by default): the expensive reference."""
    pairs = _chain(grid or leading_grid(50))
    steps = [_tuned(t, s, lora, guidance, grad=True, checkpoint=checkpoint) for t, s in pairs]
    return ChainPlan("full-bptt", tuple(_mark_last_readout(steps)), trains=lora.names)


def drtune_plan(gen: torch.Generator, lora: LoraSetSpec, guidance: float, grid: Sequence[int] | None = None,
                trained: int = 5, exit_window: tuple[int, int] = (40, 49)) -> ChainPlan:
    """DRTune: the denoiser input is stop-gradient at every step, ``trained`` evenly spaced steps (random offset)
    carry gradient through the network, the gradient flows back along the DDIM skip path, and the chain exits
    early at a random step, whose predicted clean sample is read out."""
    pairs = _chain(grid or leading_grid(50))
    lo, hi = exit_window
    if not 0 <= lo <= hi < len(pairs):
        raise ValueError(f"DRTune exit window must lie in 0..{len(pairs) - 1}, got {exit_window}")
    exit_at = int(torch.randint(lo, hi + 1, (), generator=gen))
    n = exit_at + 1
    trained = max(1, min(trained, n))
    stride = n // trained
    offset = int(torch.randint(0, stride, (), generator=gen)) if stride > 1 else 0
    chosen = {offset + i * stride for i in range(trained)}
    steps = [_tuned(t, s, lora, guidance, grad=i in chosen, detach_input=True,
                    readout="x0" if i == exit_at else None) for i, (t, s) in enumerate(pairs[:n])]
    return ChainPlan("drtune", tuple(steps), info={"exit": exit_at, "trained": sorted(chosen)}, trains=lora.names)

"""The import structure the README's Layout section states: the library's layers import downwards only and form no
cycle, no library module imports a host (the command line) or the testing tools, the library never imports ComfyUI,
and the nodes import only the library's public surface, every name of which resolves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "shortft_core"

# The layers, lowest first (README, "Layout"); a module may import its own layer and the ones below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("settings", "files", "families", "compat", "segments", "schedule", "ldm_keys", "memory", "images", "tokenizer",
                     "prompts", "tiny_world.scenes", "tiny_world.quality_property", "rewards.base",
                     "rewards.preprocess", "rewards.weights", "rewards.combine", "rewards.pixel")),
    ("models", ("models", "adapters", "lifecycle", "loading", "lora_io", "shortcut", "tiny_world", "rewards",
                "rewards.aesthetic", "rewards.clip", "rewards.image_reward", "rewards.registry")),
    ("chains", ("plans", "methods", "chain", "sampling", "lora_set", "config")),
    ("loops", ("checkpoint", "loop", "trainer", "distillation", "plots")),
    ("sessions", ("runs", "session")),
    ("hosts and tools", ("cli", "cli.common", "cli.sample", "cli.train", "cli.distill", "cli.export", "cli.score",
                         "__main__", "tiny_world.build", "tiny_world.quality", "testing", "testing.parity",
                         "testing.profiling", "testing.random_models")),
]
LAYER_OF = {f"shortft_core.{m}": i for i, (_, mods) in enumerate(LAYERS) for m in mods}
HOSTS = ("shortft_core.cli", "shortft_core.__main__")
TOOLS = ("shortft_core.testing",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module imported, names imported from it) of every import statement, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def _library_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in LIB.rglob("*.py")}


def _library_edges() -> dict[str, set[str]]:
    """Module -> the library modules it imports (a ``from package import submodule`` counts as the submodule)."""
    mods = _library_modules()
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        targets = set()
        for _, target, names in _imports(path):
            if not target.startswith("shortft_core"):
                continue
            found = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods] or [target]
            for t in found:
                while t not in mods and "." in t:
                    t = t.rpartition(".")[0]
                if t not in (mod, "shortft_core"):
                    targets.add(t)
        edges[mod] = targets
    return edges


def test_every_library_module_has_a_layer():
    missing = sorted(m for m in _library_modules() if m != "shortft_core" and m not in LAYER_OF)
    assert not missing, f"add these modules to a layer here and in the README's Layout section: {missing}"


def test_layers_import_downwards_only():
    upward = [f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {t} ({LAYERS[LAYER_OF[t]][0]})"
              for m, targets in _library_edges().items() if m in LAYER_OF
              for t in targets if LAYER_OF.get(t, -1) > LAYER_OF[m]]
    assert not upward, upward


def test_no_import_cycle():
    edges = _library_edges()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_library_code_imports_no_host_tool_or_comfyui():
    bad = []
    for mod, path in _library_modules().items():
        is_host = mod.startswith(HOSTS)
        is_tool = mod.startswith(TOOLS)
        for line, target, _ in _imports(path):
            top = target.split(".")[0]
            if top in ("comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "nodes"):
                bad.append(f"{mod}:{line} imports ComfyUI's {target}")
            if not is_host and target.startswith(HOSTS):
                bad.append(f"{mod}:{line} imports the host {target}")
            if not is_tool and target.startswith(TOOLS):
                bad.append(f"{mod}:{line} imports the testing tool {target}")
    assert not bad, bad


def test_nodes_import_only_the_public_surface():
    import shortft_core

    public = set(shortft_core.__all__)
    bad = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for line, target, names in _imports(path):
            if not target.startswith("shortft_core"):
                continue
            where = f"nodes/{path.name}:{line}"
            if target != "shortft_core":
                bad.append(f"{where} imports {target} (import from shortft_core itself)")
            bad += [f"{where} imports {n}, not in shortft_core.__all__" for n in names if n not in public]
    assert not bad, bad


def test_the_public_surface_resolves_and_stays_lazy():
    """Every public name loads, and ``import shortft_core`` alone imports no heavy dependency."""
    import subprocess
    import sys

    import shortft_core

    for name in shortft_core.__all__:
        assert getattr(shortft_core, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        shortft_core.nothing_here  # noqa: B018
    code = "import sys, shortft_core; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert importlib.import_module("shortft_core").TrainRequest.__module__ == "shortft_core.session"

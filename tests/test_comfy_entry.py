"""The pack's ComfyUI entry point must not break imports or pytest where ComfyUI is absent."""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_pack():
    spec = importlib.util.spec_from_file_location("shortft_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pack_imports_without_comfyui():
    pack = _load_pack()
    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    assert (ROOT / pack.WEB_DIRECTORY).is_dir()


@pytest.mark.skipif(importlib.util.find_spec("comfy_api") is not None, reason="ComfyUI is importable here")
def test_entrypoint_needs_comfy_api_only_when_called():
    import asyncio

    pack = _load_pack()
    with pytest.raises(ModuleNotFoundError, match="comfy_api"):
        asyncio.run(pack.comfy_entrypoint())


def test_core_never_imports_comfyui():
    import re

    pattern = re.compile(r"^\s*(from|import)\s+(comfy|comfy_api|folder_paths|server|nodes)\b", re.M)
    offenders = [str(p) for p in (ROOT / "shortft_core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_requirements_match_project_dependencies():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(deps) == sorted(reqs)
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip() in ("torch", "torchvision") for r in reqs)

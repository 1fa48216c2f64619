"""ComfyUI V3 nodes of the ShortFT pack: thin adapters between ComfyUI objects and ``shortft_core``.

Only imported inside a ComfyUI process (it needs ``comfy_api``). Node ids are prefixed ``ShortFT`` and frozen
once released; new inputs are only appended, optional, with defaults. Each node module exports its classes as
``NODES`` and imports the library relatively (``from ..shortft_core...``), so the pack runs from its folder in
custom_nodes without being pip-installed.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import NODES as APPLY_NODES
from .common import register_folders
from .live import register_routes
from .model import NODES as MODEL_NODES
from .reward import NODES as REWARD_NODES
from .train import NODES as TRAIN_NODES
from .tiny_world import NODES as TINY_WORLD_NODES


class ShortFTExtension(ComfyExtension):
    """The pack's extension: every node module's ``NODES``."""

    async def on_load(self) -> None:
        register_folders()
        register_routes()  # the live state the web chart rebuilds itself from after a page reload

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*MODEL_NODES, *REWARD_NODES, *TRAIN_NODES, *APPLY_NODES, *TINY_WORLD_NODES]

"""ComfyUI V3 nodes of the ShortFT pack: thin adapters between ComfyUI objects and ``shortft_core``.

Only imported inside a ComfyUI process (it needs ``comfy_api``). Node ids are prefixed ``ShortFT`` and frozen
once released; new inputs are only appended, optional, with defaults.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class ShortFTExtension(ComfyExtension):
    """The pack's extension; nodes are registered here as the training and apply nodes land."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []

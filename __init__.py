"""ShortFT for ComfyUI - the ComfyUI entry point (V3 schema).

ComfyUI imports this file as a package and awaits ``comfy_entrypoint()``. Nothing ComfyUI-specific is imported
at module import time, so ``import shortft_core`` and pytest work where ComfyUI is absent.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (imported lazily: it needs ``comfy_api``)."""
    from .nodes import ShortFTExtension

    return ShortFTExtension()

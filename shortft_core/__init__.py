"""ShortFT core library: shortcut-based reward fine-tuning of text-to-image diffusion models.

This package never imports ComfyUI; the ComfyUI nodes in ``nodes/`` are thin wrappers around it.
"""

__version__ = "0.1.0"

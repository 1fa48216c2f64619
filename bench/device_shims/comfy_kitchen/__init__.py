"""A stand-in for comfy-kitchen on a benchmark machine without it: ComfyUI's optional quantised kernels report
themselves unavailable (its own fallbacks then run); anything else raises ImportError or AttributeError as a
missing package would."""


def int8_attention_is_available() -> bool:
    """ComfyUI asks this at import: no int8 attention kernels here."""
    return False

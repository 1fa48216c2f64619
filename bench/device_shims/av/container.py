"""Part of the PyAV stand-in (bench/device_shims/README.md)."""

from av import placeholder as __getattr__  # noqa: F401

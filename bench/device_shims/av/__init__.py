"""A stand-in for PyAV on a benchmark machine without it: names resolve at import, using one raises."""

from __future__ import annotations

from typing import Any, NoReturn


class _Unavailable(type):
    """A class whose attributes are named placeholders (enum members used as dict keys at import) and whose use
    raises."""

    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(f"PyAV is not installed on this machine ({cls.__name__} used): install av")


def placeholder(name: str) -> type:
    """The module attribute ``name``: a placeholder class (PEP 562 module ``__getattr__``)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable(name, (), {})


__getattr__ = placeholder

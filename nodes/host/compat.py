"""Host versions differ in signatures; asking a function what it takes is exact where retrying on TypeError
would hide a TypeError raised inside the call."""

from __future__ import annotations

import inspect


def takes(fn, name: str) -> bool:
    """Whether host function ``fn`` accepts keyword ``name``."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

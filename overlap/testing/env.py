"""Setting environment variables for a block of code (the kernel backends read their tuning
knobs from the environment when a buffer is set up)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def temporary_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` for the ``with`` block, then restore every variable (unset ones stay unset)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""Completion events for asynchronous dispatch/combine."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


class EPEvent:
    """Completion of an asynchronous dispatch or combine.

    The tensors an ``*_async`` call returns are valid only after :meth:`wait`. On GPU,
    ``wait()`` makes the *current stream* wait for the communication (the host does not
    block), so work queued afterwards sees the data; on CPU (gloo) it blocks the calling
    thread. Post-processing that must follow the transfer (e.g. the fp32 reduction of a
    combine) is queued by the first ``wait()``.
    """

    def __init__(self, works: Iterable[object] = (), finalize: Optional[Callable[[], None]] = None,
                 cuda_event: Optional[torch.cuda.Event] = None):
        self._works = list(works)
        self._finalize = finalize
        self._cuda_event = cuda_event
        self._waited = False

    def wait(self) -> None:
        """Order the caller after the communication; idempotent."""
        if self._waited:
            return
        for work in self._works:
            work.wait()
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)
        if self._finalize is not None:
            self._finalize()
        self._waited = True

    def is_completed(self) -> bool:
        """True when the transfers have finished (does not run the finalizer)."""
        works_done = all(w.is_completed() for w in self._works)
        event_done = self._cuda_event is None or self._cuda_event.query()
        return works_done and event_done

    @classmethod
    def completed(cls) -> "EPEvent":
        """An event that is already complete (for synchronous paths that share the async API)."""
        ev = cls()
        ev._waited = True
        return ev

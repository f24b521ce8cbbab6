"""Dispatch/combine backends. Importing this package registers every backend built here."""
from overlap.ep.backends.base import (EPBackend, available_backends, backend_names, get_backend_class,
                                      register_backend)
from overlap.ep.backends import torch_backend  # noqa: F401  (registers "torch")
from overlap.ep.backends import cuda_backend  # noqa: F401
from overlap.ep.backends import triton_backend  # noqa: F401

__all__ = ["EPBackend", "available_backends", "backend_names", "get_backend_class", "register_backend"]

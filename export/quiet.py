"""Silence two known, harmless message families that torchao prints when it is imported (litert-torch imports it,
so every TFLite export showed them), and nothing else.

Both go through Python ``logging`` (not ``print``, not C++ stderr), so each is dropped by a filter on the one logger
that emits it, matched by its text; every other record of those loggers still shows:

- ``torchao``: ``Failed to load .../torchao/_C_mxfp8...so: Could not load this library`` -- torchao's CUDA-only
  kernels (mxfp8, cutlass sm90a) on a CPU build of torch, where they cannot load and are never used. Dropped only
  when torch has no CUDA: on a CUDA build the same line may be a real problem and stays.
- ``torch.utils._pytree``: ``<enum 'KernelPreference'> is an Enum subclass and is now natively supported ...
  register_constant() ... deprecated`` -- torchao registering its enums the old way, a note for torchao's authors.

Call ``quiet_known_noise()`` before torchao is imported (a filter does not reach records already emitted); it
imports nothing itself and may be called any number of times.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

TORCHAO_LOGGER = "torchao"
PYTREE_LOGGER = "torch.utils._pytree"


def _torch_has_cuda() -> bool:
    torch = sys.modules.get("torch")  # torchao imports torch before it loads its libraries
    return torch is not None and getattr(getattr(torch, "version", None), "cuda", None) is not None


def is_torchao_library_failure(message: str) -> bool:
    """torchao's "Failed to load <its own .so>" line, on a torch build without CUDA."""
    return message.startswith("Failed to load ") and "torchao" in message and ".so" in message and not _torch_has_cuda()


def is_enum_register_constant_notice(message: str) -> bool:
    """torch's deprecation notice for ``register_constant()`` on an Enum subclass."""
    return "is an Enum subclass and is now natively supported" in message and "register_constant()" in message


class _DropMatching(logging.Filter):
    """Drops the records whose message ``matches``; lets every other one through."""

    def __init__(self, matches: Callable[[str], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record.getMessage())


_FILTERS = {TORCHAO_LOGGER: is_torchao_library_failure, PYTREE_LOGGER: is_enum_register_constant_notice}


def quiet_known_noise() -> None:
    """Install the two filters (once per logger)."""
    for name, matches in _FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.matches is matches for f in logger.filters):
            logger.addFilter(_DropMatching(matches))

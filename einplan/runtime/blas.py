"""The BLAS libraries of this process, found once, for the steps that cap their threads."""

from __future__ import annotations

import functools

from threadpoolctl import ThreadpoolController


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The BLAS libraries of this process (found once: looking them up takes milliseconds)."""
    return ThreadpoolController()

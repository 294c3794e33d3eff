"""Keep the Triton 3.6 interpreter (TRITON_INTERPRET=1, used by the CPU tests) working with NumPy >= 2.4.

The interpreter stores scalars as 1-element arrays and converts them for `range(lo, hi)` with
`int(array)`, which NumPy 2.4 turned from a deprecation into a TypeError ("only 0-dimensional arrays can be
converted to Python scalars"): every loop with run-time bounds failed. We re-register `__index__` with an
explicit `.item()`. No effect on compiled (GPU) kernels.
"""

from __future__ import annotations

import os


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_mor_ds_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    patched._mor_ds_patched = True
    interpreter._patch_lang_tensor = patched

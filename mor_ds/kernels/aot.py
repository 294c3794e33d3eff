"""Compile the kernels for Hopper (sm_90) ahead of time, with no GPU: `python -m mor_ds.kernels.aot`.

Uses Triton's bundled ptxas. Catches GPU-only compile errors on CPU machines and reports, per kernel, whether the
tile matmuls are Hopper `wgmma`, whether tiles load with 16-byte `cp.async`, and any local-memory spills. Needs
the compiler, not the interpreter: run it with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import json

from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mor_ds.kernels.block_ranges import block_ranges_kernel
from mor_ds.kernels.flash_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from mor_ds.kernels.flash_fwd import attention_fwd_kernel

_POINTER_TYPES = {**dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], "*bf16"),
                  **dict.fromkeys(["LSE", "DELTA"], "*fp32"), **dict.fromkeys(["CUQ", "CUK", "RANGES"], "*i32"),
                  **dict.fromkeys(["QPOS", "KPOS", "QDOC", "KDOC", "QROWS", "KROWS"], "*i64")}
# the most general variant: fused gather/scatter, document ids, int64 positions, GQA
_ATTENTION_FLAGS = dict(HAS_DOC=True, VARLEN=False, Q_GATHER=True, KV_GATHER=True, Q_POS_IS_INDEX=False,
                        KV_POS_IS_INDEX=False, UPCAST=False, GROUP=3, HEAD_DIM=64, BLOCK_M=64, BLOCK_N=64)
_RANGES_FLAGS = dict(FWD_Q=128, FWD_K=64, BWD_Q=64, BWD_K=64, CHUNK=16, Q_POS_IS_INDEX=False, KV_POS_IS_INDEX=True,
                     HAS_DOC=True, VARLEN=True)


def compile_for_hopper() -> dict[str, dict[str, bool]]:
    report = {}
    for kernel, constexprs in [(attention_fwd_kernel, _ATTENTION_FLAGS), (attention_bwd_dq_kernel, _ATTENTION_FLAGS),
                               (attention_bwd_dkdv_kernel, _ATTENTION_FLAGS), (block_ranges_kernel, _RANGES_FLAGS)]:
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else _POINTER_TYPES.get(n, "fp32" if "scale" in n else "i32")
                     for n in names}
        # pointers and strides are 16-aligned in practice, and Triton specializes on that at run time
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if n not in constexprs and "scale" not in n and not n.startswith(("num_", "seqlen"))}
        compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        ptx = compiled.asm["ptx"]
        report[kernel.__name__] = {"wgmma": "wgmma.mma_async" in ptx,
                                   "cp_async_16B": "cp.async.cg.shared.global" in ptx,
                                   "spills": "ld.local" in ptx}
    return report


if __name__ == "__main__":
    print(json.dumps(compile_for_hopper()))

"""Compile the kernels for Hopper (sm_90a) ahead of time, with no GPU: `python -m mor_ds.kernels.aot`.

Uses Triton's bundled ptxas. Catches GPU-only compile errors on CPU machines and reports, per kernel and head
dim at its default tile config, whether the tile matmuls are Hopper `wgmma`, whether tiles load with 16-byte
`cp.async`, the registers per thread and the bytes spilled to local memory (from `ptxas -v`: spills happen
in ptxas, after the PTX, so the PTX alone cannot show them). Needs the compiler, not the interpreter: run it
with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile

import torch
from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from mor_ds.kernels.attention import ZERO_SPAN, TileConfig, default_configs
from mor_ds.kernels.block_ranges import block_ranges_kernel
from mor_ds.kernels.flash_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from mor_ds.kernels.flash_fwd import attention_fwd_kernel

_POINTER_TYPES = {**dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], "*bf16"),
                  **dict.fromkeys(["LSE", "DELTA"], "*fp32"), **dict.fromkeys(["CUQ", "CUK", "RANGES"], "*i32"),
                  **dict.fromkeys(["QPOS", "KPOS", "QDOC", "KDOC", "QROWS", "KROWS"], "*i64"),
                  **dict.fromkeys(["QMAP", "KMAP"], "*i8")}
# the most general variant: fused gather/scatter with in-kernel zero-fill, document ids, int64 positions, GQA
_ATTENTION_FLAGS = dict(HAS_DOC=True, VARLEN=False, Q_GATHER=True, KV_GATHER=True, Q_POS_IS_INDEX=False,
                        KV_POS_IS_INDEX=False, UPCAST=False, GROUP=3, ZERO_SPAN=ZERO_SPAN)
_RANGES_FLAGS = dict(FWD_Q=128, FWD_K=64, BWD_Q=64, BWD_K=64, CHUNK=16, Q_POS_IS_INDEX=False, KV_POS_IS_INDEX=True,
                     HAS_DOC=True, VARLEN=True, Q_MAP=True, K_MAP=True)


def ptxas_report(ptx: str) -> dict[str, int]:
    """Registers per thread and spilled bytes (stores + loads) of one kernel, from `ptxas -v` for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs.group(1)) if regs else 0, "spill_bytes": sum(spills)}


def compile_kernel(kernel, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Facts about one kernel variant compiled for sm_90a."""
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else _POINTER_TYPES.get(n, "fp32" if "scale" in n else "i32")
                 for n in names}
    # pointers and strides are 16-aligned in practice, and Triton specializes on that at run time
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and "scale" not in n and not n.startswith(("num_", "seqlen", "full_len"))}
    compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    return {"wgmma": "wgmma.mma_async" in ptx, "cp_async_16B": "cp.async.cg.shared.global" in ptx,
            "shared_bytes": compiled.metadata.shared, **ptxas_report(ptx)}


def attention_variant(kernel, head_dim: int, tile: TileConfig, **flags) -> dict:
    constexprs = dict(_ATTENTION_FLAGS, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **flags)
    return compile_kernel(kernel, constexprs, tile.num_warps, tile.num_stages)


def compile_for_hopper() -> dict[str, dict]:
    """Every kernel at its default configs for D = 64 and 128."""
    report = {}
    for head_dim in (64, 128):
        cfg = default_configs(head_dim, torch.device("cuda"))
        for kernel, tile in [(attention_fwd_kernel, cfg.fwd), (attention_bwd_dq_kernel, cfg.dq)]:
            report[f"{kernel.__name__} D={head_dim}"] = attention_variant(kernel, head_dim, tile)
        report[f"attention_bwd_dkdv_kernel D={head_dim}"] = attention_variant(
            attention_bwd_dkdv_kernel, head_dim, cfg.dkdv, SINGLE_LOOP=cfg.dkdv_single_loop)
    report["block_ranges_kernel"] = compile_kernel(block_ranges_kernel, _RANGES_FLAGS, 4, 3)
    return report


if __name__ == "__main__":
    print(json.dumps(compile_for_hopper()))

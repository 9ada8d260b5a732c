"""Compile flash-attn-4's Hopper kernels for the project's attention call without a GPU (a pre-flight check).

    PYTHONPATH=SITE:SITE/nvidia_cutlass_dsl/dsl_packages:. python benchmarks/flash_compile_check.py

SITE: a folder where flash-attn-4 and its CuTe-DSL wheels are installed for this Python
(`pip install --target SITE --no-deps ...`, as benchmarks/gpu_run.sh does on the GPU machine).  Under
torch's FakeTensorMode, tensors have shapes and devices but no data, so flash-attn-4 runs its whole
Python path and compiles its sm90 kernels (CuTe DSL -> cubin) but launches nothing.  Checked: the call in
calm_train.models.attention.FlashCoreAttention (keywords, the (out, lse) result, [B, S, H, D] views of
megatron's strided q/k/v) for a CALM-M layer, the KV-cache decode call (fewer queries than keys, causal
bottom-right) and the backward kernels.  Numbers and speed need the GPU: benchmarks/gpu_check.py.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.update(FLASH_ATTENTION_ARCH="sm_90", CUTE_DSL_ARCH="sm_90a", FLASH_ATTENTION_NUM_SMS="132")

import torch  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from calm_train.config import BackboneArch  # noqa: E402
from calm_train.models.attention import FlashCoreAttention  # noqa: E402
from calm_train.models.backbone import transformer_config  # noqa: E402
from calm_train.parallel import runtime  # noqa: E402


def main() -> int:
    from flash_attn.cute.interface import _flash_attn_bwd
    S, B, H, D = 2048, 4, 16, 64            # CALM-M: 2048 positions, 16 heads of 64
    with runtime.single_process(seed=0):
        config = transformer_config(BackboneArch(hidden_size=H * D, intermediate_size=2752, num_layers=1,
                                                 num_heads=H), tp=1, pp=1, dtype=torch.bfloat16)
        core = FlashCoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                  attention_type="self")
    with FakeTensorMode(allow_non_fake_inputs=True):
        qkv_SBHX = torch.empty(S, B, H, 3 * D, dtype=torch.bfloat16, device="cuda")
        q, k, v = qkv_SBHX.split(D, dim=-1)               # strided views, as megatron's SelfAttention passes them
        t0 = time.perf_counter()
        out_SBHD = core.attend(q, k, v, 0)
        assert tuple(out_SBHD.shape) == (S, B, H, D), out_SBHD.shape
        print(f"forward (causal, {S} x {B} x {H} x {D}): compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        decode_SBHD = core.attend(q[-16:], k, v, S - 16)
        assert tuple(decode_SBHD.shape) == (16, B, H, D), decode_SBHD.shape
        print("decode (16 queries over 2048 keys): ok", flush=True)
        o_BSHD = torch.empty(B, S, H, D, dtype=torch.bfloat16, device="cuda")
        lse_BHS = torch.empty(B, H, S, dtype=torch.float32, device="cuda")
        t0 = time.perf_counter()
        grads = _flash_attn_bwd(*(x.transpose(0, 1) for x in (q, k, v)), o_BSHD, o_BSHD, lse_BHS, None, True)
        assert [tuple(g.shape) for g in grads[:3]] == [(B, S, H, D)] * 3
        print(f"backward: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    print("flash_compile_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

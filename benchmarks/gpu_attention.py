"""The attention section of the GPU check (benchmarks/gpu_check.py): the project's core attention ([S, B, H, D]),
flash-attn-4 (FlashCoreAttention; its first call compiles its kernels and is timed apart), torch's own SDPA choice
and each forced SDPA backend, against SDPA-MATH in fp32 on the upcast inputs: max |err| and ||err|| / ||ref|| of
the output and of dq, dk, dv; forward and forward+backward times; plus a decode step (16 new queries over a cache)
and grouped-query attention (4 query heads per k/v head) against the same fp32 reference.  `report(line)` prints
and keeps each result line.
"""
from __future__ import annotations

import contextlib
import time

import torch
from common import rel_err, sync, time_ms


def attention_cores(device: torch.device, dtype: torch.dtype, H: int, D: int, kv_heads: int | None = None):
    """(SDPACoreAttention, FlashCoreAttention or None, why flash cannot run) for H heads of size D."""
    from megatron.core.transformer.enums import AttnMaskType

    from calm_train.config import BackboneArch
    from calm_train.models.attention import FlashCoreAttention, SDPACoreAttention, flash_unavailable_reason
    from calm_train.models.backbone import transformer_config
    arch = BackboneArch(hidden_size=H * D, intermediate_size=4 * H * D, num_layers=1, num_heads=H,
                        num_kv_heads=kv_heads)
    config = transformer_config(arch, tp=1, pp=1, dtype=dtype)
    make = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    reason = flash_unavailable_reason(dtype, D)
    flash = FlashCoreAttention(**make).to(device) if reason is None else None
    return SDPACoreAttention(**make).to(device), flash, reason


def section_attention(device: torch.device, size: dict, report) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, S, D = (size["attn"][k] for k in "BHSD")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sdpa, flash, reason = attention_cores(device, dtype, H, D)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q_SBHD, k_SBHD, v_SBHD, dout_SBHD = (torch.randn(S, B, H, D, generator=gen).to(device, dtype) for _ in range(4))
    dout_SBX = dout_SBHD.flatten(2)

    def run(core, inputs):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        out_SBX = core(*leaves, None)
        out_SBX.backward(dout_SBX.to(out_SBX.dtype))
        return out_SBX, [x.grad for x in leaves]

    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_grads = run(sdpa, [x.float() for x in (q_SBHD, k_SBHD, v_SBHD)])
    flops_fwd = 4 * B * H * S * S * D / 2          # two [S, S] products, causal half
    rows = {"flash-attn-4": (flash, None)}
    rows.update({"sdpa-default": (sdpa, None), "sdpa-flash": (sdpa, SDPBackend.FLASH_ATTENTION),
                 "sdpa-efficient": (sdpa, SDPBackend.EFFICIENT_ATTENTION), "sdpa-cudnn": (sdpa, SDPBackend.CUDNN_ATTENTION),
                 f"sdpa-math-{str(dtype)[6:]}": (sdpa, SDPBackend.MATH)})
    out = {"shape_SBHD": [S, B, H, D], "dtype": str(dtype), "reference": "SDPA MATH, float32, upcast inputs",
           "flash_attn_4": reason or "available", "backends": {}}
    for name, (core, backend) in rows.items():
        try:
            if core is None:
                raise RuntimeError(f"flash cannot run here: {reason}")
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                t0 = time.perf_counter()
                o, grads = run(core, (q_SBHD, k_SBHD, v_SBHD))
                sync(device)
                row = {"first_call_s": time.perf_counter() - t0, "out": rel_err(o, ref_out)}
                row.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
                with torch.no_grad():
                    row["fwd"] = time_ms(lambda: core(q_SBHD, k_SBHD, v_SBHD, None), device, size["attn_iters"])
                row["fwd_bwd"] = time_ms(lambda: run(core, (q_SBHD, k_SBHD, v_SBHD)), device, size["attn_iters"])
            row["fwd_tflops"] = flops_fwd / row["fwd"]["median_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd"]["median_ms"] / 1e9
            report(f"[attention] {name:17s} out rel {row['out']['rel']:.2e} max {row['out']['max_abs']:.2e}  "
                   f"dq rel {row['dq']['rel']:.2e} dk {row['dk']['rel']:.2e} dv {row['dv']['rel']:.2e}  "
                   f"fwd {row['fwd']['median_ms']:.3f} ms  fwd+bwd {row['fwd_bwd']['median_ms']:.3f} ms "
                   f"({row['fwd_bwd_tflops']:.4g} TFLOP/s)  first call {row['first_call_s']:.2f} s")
        except Exception as exc:                              # noqa: BLE001 - a backend may not exist here
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            report(f"[attention] {name:17s} unavailable: {row['error'][:160]}")
        out["backends"][name] = row
    out["cases"] = attention_cases(device, dtype, size, report)
    return out


def attention_cases(device: torch.device, dtype: torch.dtype, size: dict, report) -> dict:
    """A decode step (16 new queries at positions S-16.. over S cached keys, the KV-cache path) and GQA
    (H/4 k/v heads), forward only, flash-attn-4 and SDPA against SDPA-MATH in fp32 with the explicit mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, S, D = (size["attn"][k] for k in "BHSD")
    gen = torch.Generator(device="cpu").manual_seed(1)
    out = {}
    for case, kv_heads, new in (("decode", H, 16), ("gqa", max(1, H // 4), S)):
        sdpa, flash, reason = attention_cores(device, dtype, H, D, kv_heads)
        q = torch.randn(new, B, H, D, generator=gen).to(device, dtype)
        k, v = (torch.randn(S, B, kv_heads, D, generator=gen).to(device, dtype) for _ in range(2))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref = sdpa.attend(q.float(), k.float(), v.float(), S - new)
        rows = {}
        for name, core in (("flash-attn-4", flash), ("sdpa-default", sdpa)):
            if core is None:
                rows[name] = {"error": f"flash cannot run here: {reason}"}
                continue
            try:
                with torch.no_grad():
                    rows[name] = rel_err(core.attend(q, k, v, S - new), ref)
            except Exception as exc:                          # noqa: BLE001 - recorded
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        out[case] = {"q_SBHD": list(q.shape), "kv_SBHD": list(k.shape), **rows}
        report(f"[attention] {case:6s} " + "  ".join(
            f"{n}: " + (f"rel {r['rel']:.2e} max {r['max_abs']:.2e}" if "rel" in r else r["error"][:80])
            for n, r in rows.items()))
    return out

"""Core attention modules for megatron's layer spec, and the KV cache used for generation.

megatron's SelfAttention projects q/k/v, applies RoPE and calls `core_attention(q, k, v, ...)`
with [seq, batch, heads_per_partition, head_dim] tensors; the module returns
[seq, batch, heads_per_partition * head_dim].  The backend is chosen once, in the spec
(`resolve_attention`), never by branches in the model:

    softmax(q k^T * scale + causal) v       scale = 1/sqrt(head_dim)

* SDPACoreAttention: torch.nn.functional.scaled_dot_product_attention (CPU and GPU).
* FlashCoreAttention: FlashAttention-4, `flash_attn.cute.flash_attn_func` (pip package
  flash-attn-4; CUDA on Hopper/Blackwell, bf16/fp16, no attention dropout).

`model.attention=auto` takes flash where it can run and SDPA otherwise; `flash` on a machine
where it cannot run is refused (ConfigError naming the reason), never silently replaced.

Both read the KV cache that `use_kv_cache(cache)` makes active: each layer appends its new
keys/values (already rotated at their absolute positions) and its queries attend to every
cached key, causally within the new block.  Without a cache the attention is plain causal.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from calm_train.config import ConfigError

ATTENTION_BACKENDS = ("auto", "flash", "sdpa")
FLASH_MIN_CAPABILITY = (9, 0)       # flash-attn-4 targets Hopper (sm90) and Blackwell (sm100+)
FLASH_HEAD_DIMS = range(8, 257, 8)  # its sm90 kernels: 8 <= head_dim <= 256, a multiple of 16 bytes in bf16


class KVCache:
    """Keys/values of every attention layer of one backbone stage, for positions [0, length)."""

    def __init__(self):
        self.length = 0            # positions already cached (advanced by the backbone after a forward)
        self._kv_SBHD: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer_number: int, k_SBHD: torch.Tensor, v_SBHD: torch.Tensor):
        """Append the new positions of one layer; return all its keys and values."""
        if layer_number in self._kv_SBHD:
            past_k, past_v = self._kv_SBHD[layer_number]
            k_SBHD, v_SBHD = torch.cat([past_k, k_SBHD]), torch.cat([past_v, v_SBHD])
        self._kv_SBHD[layer_number] = (k_SBHD, v_SBHD)
        return k_SBHD, v_SBHD

    def select(self, length: int, rows_R: torch.Tensor) -> "KVCache":
        """A new cache of positions [0, length) for the batch rows `rows_R` (repeats allowed: one row per rollout)."""
        out = KVCache()
        out.length = length
        out._kv_SBHD = {n: (k[:length].index_select(1, rows_R), v[:length].index_select(1, rows_R))
                        for n, (k, v) in self._kv_SBHD.items()}
        return out

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on."""
        self.length = length
        self._kv_SBHD = {n: (k[:length], v[:length]) for n, (k, v) in self._kv_SBHD.items()}


_ACTIVE_CACHE: contextvars.ContextVar[KVCache | None] = contextvars.ContextVar("kv_cache", default=None)


@contextlib.contextmanager
def use_kv_cache(cache: KVCache | None):
    """Make `cache` the one every core-attention module reads and extends (None: no cache)."""
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE_CACHE.reset(token)


class _CoreAttention(MegatronModule):
    """Shared part: megatron's constructor/call interface and the KV cache; `attend` is the kernel."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError(f"{type(self).__name__} implements causal self-attention only, "
                             f"got mask {attn_mask_type} and attention type {attention_type!r}")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("the project's core attention is causal by construction: pass "
                             "attention_mask=None and no attention_bias / packed_seq_params")
        cache = _ACTIVE_CACHE.get()
        past = 0
        if cache is not None:
            past = cache.length
            key, value = cache.extend(self.layer_number, key, value)
        out_SBHD = self.attend(query, key, value, past)
        return out_SBHD.reshape(out_SBHD.shape[0], out_SBHD.shape[1], -1)

    def attend(self, q_SBHD, k_SBHD, v_SBHD, past: int) -> torch.Tensor:
        raise NotImplementedError


class SDPACoreAttention(_CoreAttention):
    def attend(self, q_SBHD, k_SBHD, v_SBHD, past: int) -> torch.Tensor:
        q_BHSD, k_BHSD, v_BHSD = (x.permute(1, 2, 0, 3) for x in (q_SBHD, k_SBHD, v_SBHD))
        mask_QK = None
        if past:    # query i sits at absolute position past + i and sees keys 0 .. past + i
            q_pos = past + torch.arange(q_BHSD.shape[2], device=q_BHSD.device)
            mask_QK = torch.arange(k_BHSD.shape[2], device=q_BHSD.device)[None, :] <= q_pos[:, None]
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, attn_mask=mask_QK, is_causal=not past,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=k_BHSD.shape[1] != q_BHSD.shape[1])
        return out_BHSD.permute(2, 0, 1, 3)


class FlashCoreAttention(_CoreAttention):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.dropout_p:
            raise ValueError(f"FlashCoreAttention: flash-attn-4 has no attention dropout (got {self.dropout_p}); "
                             "use model.attention=sdpa for dropout")

    @torch.compiler.disable         # a CuTe-DSL kernel: compiled layers run it eagerly between their graphs
    def attend(self, q_SBHD, k_SBHD, v_SBHD, past: int) -> torch.Tensor:
        flash_attn_func = _flash_attn_func()[0]
        # [B, S, H, D] views (no copy); the causal mask is aligned bottom-right when queries are fewer than
        # keys, which is exactly "query i at position past + i sees keys 0 .. past + i".  GQA: fewer k/v heads.
        out_BSHD, _ = flash_attn_func(*(x.transpose(0, 1) for x in (q_SBHD, k_SBHD, v_SBHD)),
                                      softmax_scale=self.softmax_scale, causal=True)
        return out_BSHD.transpose(0, 1)


@functools.cache
def _flash_attn_func():
    """(flash_attn.cute.flash_attn_func, None), or (None, why it cannot be imported); imported once."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as exc:                    # noqa: BLE001 - ImportError, or a CUDA/driver error at import
        return None, (f"flash_attn.cute (pip package flash-attn-4) cannot be imported: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return flash_attn_func, None


def flash_unavailable_reason(params_dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """Why FlashCoreAttention cannot run here, or None when it can (cheap checks first, the import last)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability()
    if capability < FLASH_MIN_CAPABILITY:
        return (f"flash-attn-4 needs a Hopper or Blackwell GPU (compute capability >= 9.0), "
                f"this one is {capability[0]}.{capability[1]}")
    if params_dtype not in (torch.bfloat16, torch.float16):
        return f"flash-attn-4 needs bf16/fp16 weights, the model is {params_dtype}"
    if head_dim is not None and head_dim not in FLASH_HEAD_DIMS:
        return f"flash-attn-4 needs a head dimension in 8..256 that is a multiple of 8, the model has {head_dim}"
    return _flash_attn_func()[1]


def resolve_attention(name: str, params_dtype: torch.dtype = torch.float32,
                      head_dim: int | None = None) -> tuple[type[_CoreAttention], str]:
    """model.attention (auto: flash when it can run here, else sdpa | flash | sdpa) -> (module class, one
    line saying which backend runs and why)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError("model.attention", f"{name!r} is unknown", f"use one of {list(ATTENTION_BACKENDS)}")
    if name == "sdpa":
        return SDPACoreAttention, "sdpa (torch scaled_dot_product_attention, as configured)"
    reason = flash_unavailable_reason(params_dtype, head_dim)
    if reason is None:
        return FlashCoreAttention, f"flash (flash_attn.cute, flash-attn-4 {_flash_version()})"
    if name == "flash":
        raise ConfigError("model.attention", f"flash cannot run here: {reason}",
                          "on a Hopper/Blackwell GPU install the gpu extra (pip install '.[gpu]') and train in bf16 "
                          "(train.dtype=bf16), or set model.attention=sdpa (auto falls back to it by itself)")
    return SDPACoreAttention, f"sdpa (model.attention=auto; flash not used: {reason})"


def _flash_version() -> str:
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"

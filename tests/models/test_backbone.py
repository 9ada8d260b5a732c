"""Backbone: shapes, causality, core attention against explicit formulas, GQA, KV cache, and the
whole megatron block against a plain-torch Llama layer written from the equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from calm_train.config import BackboneArch, ConfigError
from calm_train.models.attention import KVCache, SDPACoreAttention, resolve_attention, use_kv_cache
from calm_train.models.backbone import Backbone, transformer_config
from calm_train.models.rope import RotaryEmbedding
from calm_train.parallel import runtime
from megatron.core.transformer.enums import AttnMaskType

ARCH = BackboneArch(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module", autouse=True)
def world():
    with runtime.single_process(seed=0):
        yield


def naive_attention(q_SBHD, k_SBHD, v_SBHD, past=0):
    """softmax(q k^T / sqrt(d) + mask) v per head, kv heads repeated for GQA; query i sits at past + i."""
    rep = q_SBHD.shape[2] // k_SBHD.shape[2]
    k_SBHD, v_SBHD = k_SBHD.repeat_interleave(rep, 2), v_SBHD.repeat_interleave(rep, 2)
    scores_BHQK = torch.einsum("qbhd,kbhd->bhqk", q_SBHD, k_SBHD) / math.sqrt(q_SBHD.shape[-1])
    sq, sk = q_SBHD.shape[0], k_SBHD.shape[0]
    allowed_QK = torch.arange(sk)[None, :] <= past + torch.arange(sq)[:, None]
    probs_BHQK = scores_BHQK.masked_fill(~allowed_QK, float("-inf")).softmax(-1)
    out_SBHD = torch.einsum("bhqk,kbhd->qbhd", probs_BHQK, v_SBHD)
    return out_SBHD.reshape(sq, q_SBHD.shape[1], -1)


def core(num_kv_heads=2):
    cfg = transformer_config(BackboneArch(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                          num_kv_heads=num_kv_heads))
    return SDPACoreAttention(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_core_attention_equals_naive_formula(kv_heads):
    g = torch.Generator().manual_seed(kv_heads)
    q, k, v = torch.randn(7, 3, 4, 8, generator=g), *torch.randn(2, 7, 3, kv_heads, 8, generator=g)
    out = core(kv_heads)(q, k, v, None)
    assert out.shape == (7, 3, 32)
    assert (out - naive_attention(q, k, v)).abs().max().item() < 1e-5


def test_cached_core_attention_sees_past_and_new_block_causally():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8, generator=g), *torch.randn(2, 8, 2, 2, 8, generator=g)
    cache, attn = KVCache(), core()
    with use_kv_cache(cache):
        attn(q[:1], k[:5], v[:5], None)    # fill positions 0..4 (output unused)
        cache.length = 5
        out = attn(q, k[5:], v[5:], None)  # 3 new queries at positions 5, 6, 7
    assert (out - naive_attention(q, k, v, past=5)).abs().max().item() < 1e-5


def test_shapes_and_final_norm():
    model = Backbone(ARCH, attention="sdpa")
    y = model(torch.randn(9, 2, 32))
    assert y.shape == (9, 2, 32)
    # final RMSNorm with unit weight: every output vector has root-mean-square 1
    assert (y.pow(2).mean(-1).sqrt() - 1).abs().max().item() < 1e-4
    assert sum(p.numel() for p in model.parameters()) == 2 * (32 * 64 + 32 * 32 + 32 * 96 + 48 * 32 + 2 * 32) + 32


def test_causal_later_positions_do_not_change_earlier_outputs():
    model = Backbone(ARCH, attention="sdpa")
    x = torch.randn(8, 2, 32)
    x2 = x.clone()
    x2[5:] = torch.randn(3, 2, 32)
    y, y2 = model(x), model(x2)
    assert (y[:5] - y2[:5]).abs().max().item() == 0.0
    assert (y[5:] - y2[5:]).abs().max().item() > 1e-2


def test_kv_cache_equals_uncached_forward():
    model = Backbone(ARCH, attention="sdpa").eval()
    x = torch.randn(11, 2, 32)
    cache = KVCache()
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:6], cache), model(x[6:7], cache), model(x[7:], cache)]
    assert cache.length == 11
    assert (torch.cat(parts) - full).abs().max().item() < 1e-5


def llama_reference(model: Backbone, x_SBH: torch.Tensor) -> torch.Tensor:
    """The backbone written out with plain torch from the equations and megatron's weight layout."""
    nh, ng, d = ARCH.num_heads, ARCH.kv_heads, ARCH.hidden_size // ARCH.num_heads
    S, B, _ = x_SBH.shape
    freqs = RotaryEmbedding(d, ARCH.rope_theta)(S)[:, :, 0]         # [S, 1, d]
    cos, sin = freqs.cos(), freqs.sin()

    def rope(t_SBHD):
        t1, t2 = t_SBHD.chunk(2, -1)
        return t_SBHD * cos[:, :, None] + torch.cat([-t2, t1], -1) * sin[:, :, None]

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + ARCH.norm_eps) * w

    h = x_SBH
    for layer in model.decoder.layers:
        a = layer.self_attention
        qkv = F.linear(rms(h, layer.input_layernorm.weight), a.linear_qkv.weight)
        qkv = qkv.view(S, B, ng, (nh // ng + 2) * d)                   # per group: [q heads, k, v]
        q, k, v = qkv.split([nh // ng * d, d, d], dim=-1)
        q = q.reshape(S, B, nh, d)
        attn = naive_attention(rope(q), rope(k), v)
        h = h + F.linear(attn, a.linear_proj.weight)
        gate, up = F.linear(rms(h, layer.pre_mlp_layernorm.weight), layer.mlp.linear_fc1.weight).chunk(2, -1)
        h = h + F.linear(F.silu(gate) * up, layer.mlp.linear_fc2.weight)
    return rms(h, model.decoder.final_layernorm.weight)


def test_megatron_block_equals_plain_llama_layers_with_gqa():
    torch.manual_seed(1)
    model = Backbone(ARCH, attention="sdpa")
    with torch.no_grad():
        for p in model.parameters():                                   # non-trivial norm weights too
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 2, 32)
    assert (model(x) - llama_reference(model, x)).abs().max().item() < 1e-5


def test_weights_are_reproducible_from_the_seed():
    runtime.seed_all(7)
    a = dict(Backbone(ARCH, attention="sdpa").named_parameters())
    runtime.seed_all(7)
    b = dict(Backbone(ARCH, attention="sdpa").named_parameters())
    assert len(a) == 13 and all(torch.equal(a[key], b[key]) for key in a)


def test_attention_backend_resolution():
    """auto falls back to SDPA and says why; an explicit flash where it cannot run is refused, naming the key,
    the reason and the fix (checked before flash_attn is imported)."""
    assert resolve_attention("sdpa") == (SDPACoreAttention, "sdpa (torch scaled_dot_product_attention, as configured)")
    if not torch.cuda.is_available():
        assert resolve_attention("auto", torch.bfloat16, 64) == (
            SDPACoreAttention, "sdpa (model.attention=auto; flash not used: CUDA is not available)")
        with pytest.raises(ConfigError, match=r"'model.attention': flash cannot run here: CUDA is not available\. "
                                              r"Fix: .*pip install '\.\[gpu\]'.*model.attention=sdpa"):
            resolve_attention("flash", torch.bfloat16, 64)
        assert Backbone(ARCH, attention="auto").attention_backend.startswith("sdpa (model.attention=auto")
    with pytest.raises(ConfigError, match="'model.attention': 'xformers' is unknown"):
        resolve_attention("xformers")

"""CALM: loss, gradient flow (never into the frozen autoencoder), learning, per-sample randomness."""
import pytest
import torch

from calm_train.config import AutoencoderArch, BackboneArch, EnergyHeadArch, ModelConfig
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.calm import CALM, freeze
from calm_train.models.rng import SampleRNG, sample_seeds
from calm_train.parallel import runtime

CFG = ModelConfig(kind="calm", vocab_size=96, patch_size=4, attention="sdpa",
                  ae=AutoencoderArch(hidden_size=32, intermediate_size=64, latent_size=16),
                  backbone=BackboneArch(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
                  head=EnergyHeadArch(num_blocks=2, noise_size=8, num_samples=4, num_target_samples=16))


@pytest.fixture(scope="module", autouse=True)
def world():
    with runtime.single_process(seed=0):
        yield


def rng_for(ids, step=0):
    return SampleRNG(sample_seeds(1234, step, torch.tensor(ids)))


def tokens(batch=3, length=32, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def untrained_calm() -> CALM:
    """The head's last layer starts at zero (samples constant, no gradient below it): give it weights."""
    model = CALM(CFG)
    torch.nn.init.normal_(model.generative_head.final_layer.linears[2].weight, std=0.5)
    return model


def test_loss_is_finite_and_gradients_reach_every_part_but_the_autoencoder():
    model, ae = untrained_calm(), Autoencoder(CFG.ae, CFG.vocab_size, CFG.patch_size)   # ae NOT frozen here
    loss = model(tokens(), rng_for([0, 1, 2]), ae)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for prefix in ("embed_tokens.", "embed_proj.0.", "embed_proj.2.", "embed_proj.3.", "backbone.decoder.layers.0.",
                   "backbone.decoder.final_layernorm.", "generative_head.final_layer."):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    assert all(p.grad is None for p in ae.parameters())


def test_autoencoder_is_not_part_of_the_model():
    model, ae = CALM(CFG), freeze(Autoencoder(CFG.ae, CFG.vocab_size, CFG.patch_size))
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    model(tokens(), rng_for([0, 1, 2]), ae).backward()
    assert all(p.grad is None for p in ae.parameters())
    assert {key.split(".")[0] for key in model.state_dict()} == {"embed_tokens", "embed_proj", "backbone",
                                                                 "generative_head"}
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for p in ae.parameters())


def test_reference_layout_of_the_input_compression():
    model = CALM(CFG)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("embed_")}
    assert shapes == {"embed_tokens.weight": (96, 32), "embed_proj.0.weight": (64, 128), "embed_proj.0.bias": (64,),
                      "embed_proj.2.weight": (32, 64), "embed_proj.2.bias": (32,), "embed_proj.3.weight": (32,),
                      "embed_proj.3.bias": (32,)}
    assert model.embed(tokens(2, 32)).shape == (8, 2, 32)                      # [T, B, H]
    assert model.predict_next_latents(tokens(2, 32), 5, rng_for([0, 1])).shape == (2, 8, 5, 16)


def test_adam_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model, ae = CALM(CFG), freeze(Autoencoder(CFG.ae, CFG.vocab_size, CFG.patch_size))
    batch = tokens(4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(10):
        loss = model(batch, rng_for([0, 1, 2, 3], step), ae)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # fresh noise every step; the floor is the targets' own spread (E||Y - Y'|| ~ 5.6 here), start ~8.0
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.8, losses


def test_a_samples_loss_does_not_depend_on_its_batch():
    model, ae = untrained_calm().eval(), freeze(Autoencoder(CFG.ae, CFG.vocab_size, CFG.patch_size))
    x = tokens(3, 32, seed=5)
    with torch.no_grad():
        alone = [model(x[i:i + 1], rng_for([i]), ae).item() for i in range(3)]
        together = model(x, rng_for([0, 1, 2]), ae).item()
        reordered = model(x[[2, 0]], rng_for([2, 0]), ae).item()
    assert together == pytest.approx(sum(alone) / 3, abs=1e-5)
    assert reordered == pytest.approx((alone[2] + alone[0]) / 2, abs=1e-5)
    assert abs(alone[0] - alone[1]) > 1e-3


def test_sequence_length_must_be_a_multiple_of_k():
    with pytest.raises(ValueError, match="multiple of model.patch_size=4"):
        CALM(CFG).embed(tokens(1, 30))

"""AR baseline: vocab-parallel loss equals torch cross entropy on the gathered logits; it learns."""
import pytest
import torch
import torch.nn.functional as F

from calm_train.config import BackboneArch, ModelConfig
from calm_train.models.ar import ARModel
from calm_train.models.backbone import token_embedding, transformer_config
from calm_train.parallel import runtime

CFG = ModelConfig(kind="ar", vocab_size=96, attention="sdpa",
                  backbone=BackboneArch(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                        num_kv_heads=2))


@pytest.fixture(scope="module", autouse=True)
def world():
    with runtime.single_process(seed=0):
        yield


def tokens(batch=3, length=16, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_loss_equals_torch_cross_entropy_on_gathered_logits():
    model, x = ARModel(CFG), tokens()
    logits_BLV = model.logits(x)
    assert logits_BLV.shape == (3, 16, 96)
    expected = F.cross_entropy(logits_BLV[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1))
    loss = model(x)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(96.0)).item(), abs=0.1)   # untrained: ~uniform


def test_output_layer_is_untied_and_every_parameter_gets_a_gradient():
    model = ARModel(CFG)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    model(tokens()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_adam_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model, x = ARModel(CFG), tokens(4, 16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_vocabulary_must_split_over_tensor_parallel_ranks():
    with pytest.raises(ValueError, match="model.vocab_size=97 is not divisible by parallel.tp=2"):
        token_embedding(97, transformer_config(CFG.backbone, tp=2, pp=1))

"""Initialisation by (seed, global name): the constructors' distributions, per parameter, and a function of
the seed alone.  That every layout starts from the 1-process weights is shown from the command line in
tests/train/test_layouts_cli.py."""
import pytest
import torch

from calm_train.config import load_config
from calm_train.models.ar import ARModel
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.calm import CALM
from calm_train.parallel import runtime
from calm_train.train.tasks import task_for

WIDE = ["model.vocab_size=512", "model.backbone.hidden_size=128", "model.backbone.intermediate_size=256",
        "model.ae.hidden_size=128", "model.ae.intermediate_size=256", "model.backbone.num_layers=4"]


def models(kind: str, seed: int):
    """(the constructors' model, the model Task.build_model initialises) of tiny_<kind>."""
    cfg = load_config(f"tiny_{kind}", WIDE + [f"train.seed={seed}"] +
                      (["model.autoencoder=unused"] if kind == "calm" else []))
    ae = Autoencoder(cfg.model.ae, 512, 4) if kind == "calm" else None
    built = {"ar": lambda: ARModel(cfg.model), "calm": lambda: CALM(cfg.model),
             "autoencoder": lambda: Autoencoder(cfg.model.ae, 512, 4, cfg.model.init_std)}[kind]()
    return built, task_for(cfg, ae).build_model(cfg)


@pytest.mark.parametrize("kind", ["ar", "calm", "autoencoder"])
def test_same_distributions_as_the_constructors(kind):
    with runtime.single_process(seed=0):
        built, ours = models(kind, seed=3)
        again = models(kind, seed=3)[1]
        other = models(kind, seed=4)[1]
    params, redrawn = dict(built.named_parameters()), 0
    for name, p in ours.named_parameters():
        ref = params[name].detach()
        if (ref == ref.reshape(-1)[0]).all():                  # norms 1, biases 0, the head's zero last layer
            assert torch.equal(p, ref), name
            continue
        redrawn += 1
        assert not torch.equal(p, ref), name
        assert p.std().item() == pytest.approx(ref.std().item(), rel=0.1), name       # N(0, std), scaled or not
        assert abs(p.mean().item()) < 0.1 * ref.std().item(), name
        assert torch.equal(p, dict(again.named_parameters())[name]), name              # a function of the seed
        assert not torch.equal(p, dict(other.named_parameters())[name]), name
    assert redrawn >= {"ar": 10, "calm": 20, "autoencoder": 10}[kind]
    if kind == "ar":
        stds = {n: p.std().item() for n, p in ours.named_parameters()}
        assert stds["backbone.decoder.layers.3.mlp.linear_fc2.weight"] == pytest.approx(0.02 / 8 ** 0.5, rel=0.1)
        assert stds["backbone.decoder.layers.3.mlp.linear_fc1.weight"] == pytest.approx(0.02, rel=0.1)

"""The engine in one process (the path the training loop and the demo take first), config filling
and the learning-rate schedule."""
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import layouts  # noqa: E402

from calm_train.config import ConfigError, load_config  # noqa: E402
from calm_train.parallel.ds_config import deepspeed_config, lr_at  # noqa: E402


def test_lr_warmup_then_cosine_and_constant():
    cfg = load_config("tiny_ar", ["train.lr=1.0e-3", "train.min_lr=1.0e-4", "train.warmup_steps=4",
                                  "train.steps=14", "train.schedule=cosine"])
    assert [lr_at(cfg, s) for s in (1, 2, 4)] == pytest.approx([2.5e-4, 5e-4, 1e-3])
    assert lr_at(cfg, 9) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 14) == pytest.approx(1e-4) and lr_at(cfg, 20) == pytest.approx(1e-4)
    cfg.train.schedule = "constant"
    assert lr_at(cfg, 9) == lr_at(cfg, 14) == 1e-3


def test_deepspeed_config_is_filled_from_the_train_config():
    cfg = load_config("tiny_ar", ["train.micro_batch=2", "train.global_batch=16", "parallel.zero_stage=2"])
    ds = deepspeed_config(cfg, dp_size=2, device=torch.device("cpu"))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0 and not ds["bf16"]["enabled"]
    assert ds["optimizer"]["params"] == {"torch_adam": True, "adam_w_mode": True, "lr": cfg.train.lr,
                                         "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    pp = load_config("tiny_ar", ["train.micro_batch=2", "train.global_batch=16", "parallel.pp=2"])
    ds = deepspeed_config(pp, dp_size=1, device=torch.device("cpu"))
    assert ds["managed_gradient_accumulation"] is False and ds["gradient_accumulation_steps"] == 1
    clash = load_config("tiny_ar", ["parallel.ds_config=zero3", "parallel.zero_stage=1"])
    with pytest.raises(ConfigError, match="parallel.ds_config"):
        deepspeed_config(clash, dp_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("kind", ["ar", "calm"])
def test_single_process_engine_equals_torch_adamw(kind):
    """World of one: ZeRO-1 over DeepSpeed (4 micro-batches accumulated) equals plain torch AdamW."""
    from calm_train.parallel import runtime
    with runtime.single_process(seed=0):
        initial, ref_losses, ref_norms, ref_states = layouts.reference(kind)
        engine, world = layouts.engine_for(kind, initial, zero_stage=1)
        for step, (tokens, ids) in enumerate(layouts.batches(), 1):
            result = engine.train_step(tokens, ids, step)
            assert result.loss == pytest.approx(ref_losses[step - 1], rel=1e-6)
            assert result.grad_norm == pytest.approx(ref_norms[step - 1], rel=1e-5)
        state = engine.state_for_export()
        assert set(state) == set(ref_states[-1])
        assert max((state[k] - v).abs().max().item() for k, v in ref_states[-1].items()) < 1e-6

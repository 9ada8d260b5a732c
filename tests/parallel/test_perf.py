"""Speed switches (perf.*) on CPU: each leaves the numbers as they are (recomputation: exactly; compile:
to float32 rounding), fused AdamW is a no-op here, and a non-finite loss still poisons the step
without the host reading it."""
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import layouts  # noqa: E402

from calm_train.models.rng import SampleRNG, sample_seeds  # noqa: E402
from calm_train.parallel import runtime  # noqa: E402
from calm_train.parallel.compile import compile_hot_paths  # noqa: E402
from calm_train.parallel.ds_config import deepspeed_config  # noqa: E402
from calm_train.parallel.engine import TrainEngine, build_world  # noqa: E402
from calm_train.parallel.pipeline import poisoned  # noqa: E402
from calm_train.train.tasks import task_for  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def world():
    with runtime.single_process(seed=0):
        yield


def loss_and_grads(recompute: str = "off", compile_backend: str | None = None, head_only: bool = False):
    """One CALM forward + backward of the layouts' tiny model, 1 layer (same seed -> same weights and noise)."""
    cfg = layouts.config("calm")
    cfg.perf.recompute, cfg.model.backbone.num_layers = recompute, 1
    task = task_for(cfg, layouts.frozen_autoencoder(cfg))
    torch.manual_seed(5)
    model = task.build_model(cfg)
    if head_only:
        model.head_loss = torch.compile(model.head_loss, backend=compile_backend)
    elif compile_backend:
        assert compile_hot_paths(model, compile_backend) == ["1 backbone layers", "energy head + energy loss"]
    tokens, ids = layouts.batches()[0]
    loss = task.loss(model, tokens[:4], SampleRNG(sample_seeds(1, 1, ids[:4])))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close(a, b, rel: float):
    loss, grads = a
    loss_c, grads_c = b
    assert loss_c.item() == pytest.approx(loss.item(), rel=rel)
    for name, grad in grads.items():
        assert (grads_c[name] - grad).abs().max() <= rel * grad.abs().max() + 1e-12, name


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recomputation_gives_the_same_loss_and_gradients(mode):
    loss, grads = loss_and_grads()
    loss_r, grads_r = loss_and_grads(mode)
    assert torch.equal(loss, loss_r)
    assert grads.keys() == grads_r.keys() and all(torch.equal(grads[k], grads_r[k]) for k in grads)


def test_compiled_hot_paths_trace_to_the_eager_result():
    """Dynamo + AOTAutograd trace megatron's layer (SDPA inside) and CALM.head_loss (no kernels generated),
    each as one graph without breaks."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    assert_close(loss_and_grads(), loss_and_grads(compile_backend="aot_eager"), rel=1e-6)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_inductor_energy_head_and_loss_equal_eager():
    """Inductor's generated CPU kernels (gcc) for the energy head + energy loss: loss and every gradient within
    1e-5 of eager (relative to the largest entry; float32 rounding of the fused kernels)."""
    torch._dynamo.reset()
    assert_close(loss_and_grads(), loss_and_grads(compile_backend="inductor", head_only=True), rel=1e-5)


def test_fused_adamw_runs_on_cuda_only():
    cfg = layouts.config("ar")
    for setting, cuda_fused in (("auto", True), ("on", True), ("off", False)):
        cfg.perf.fused_adamw = setting
        assert deepspeed_config(cfg, 1, torch.device("cuda"))["optimizer"]["params"].get("fused", False) is cuda_fused
        assert "fused" not in deepspeed_config(cfg, 1, torch.device("cpu"))["optimizer"]["params"]
    cfg.perf.fused_adamw = "on"
    engine = TrainEngine(cfg, task_for(cfg), build_world(cfg))
    assert not engine.ds.optimizer.optimizer.defaults["fused"]
    assert "optimizer AdamW (not fused)" in engine.describe()
    assert engine.describe().startswith("attention sdpa (model.attention=auto; flash not used: CUDA is not available)")


def test_poisoned_loss_is_exact_when_finite_and_nan_otherwise():
    x = torch.tensor([1.5, -2.25], requires_grad=True)
    (poisoned((x * x).sum()) * 3).backward()
    assert torch.equal(x.grad, torch.tensor([9.0, -13.5]))
    y = torch.tensor([1.0, float("inf")], requires_grad=True)
    poisoned((y * 2).sum()).backward()
    assert y.grad.isnan().all()

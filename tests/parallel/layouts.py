"""Worker side of the layout tests: every rank of one spawned 4-process gloo world runs all cases.

Each case re-initialises megatron's groups for its layout (tp x pp, dp = 4 / (tp pp)), builds a
TrainEngine that starts from the same full initial weights (Task.init_state) and trains 3
optimizer steps on the same global batches; rank 0 records losses, gradient norms and the
exported full parameters after every step.  The reference is plain torch in one process:
the tp = pp = 1 model, micro-batch gradient accumulation, clip_grad_norm_ and torch AdamW.
"""
from __future__ import annotations

import os
import pickle
import traceback

import torch
import torch.distributed as dist

WORLD = 4
STEPS = 3
VOCAB = 64
SEQ = 16
GLOBAL_BATCH = 16
MICRO = 2


def config(kind: str, **parallel):
    from calm_train.config import load_config
    overrides = [f"model.vocab_size={VOCAB}", f"data.seq_len={SEQ}", f"train.micro_batch={MICRO}",
                 f"train.global_batch={GLOBAL_BATCH}", "train.steps=4", "train.warmup_steps=1",
                 "train.schedule=cosine", "train.lr=1.0e-3", "model.backbone.num_layers=4",
                 "model.backbone.hidden_size=32", "model.backbone.intermediate_size=64",
                 "model.head.num_target_samples=16", "model.ae.hidden_size=32", "model.ae.intermediate_size=64"]
    if kind == "calm":
        overrides.append("model.autoencoder=frozen-ae-built-in-test")
    overrides += [f"parallel.{k}={v}" for k, v in parallel.items()]
    return load_config(f"tiny_{kind}", overrides)


def batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen),
             torch.arange(GLOBAL_BATCH) + 100 * step) for step in range(1, STEPS + 1)]


def frozen_autoencoder(cfg):
    from calm_train.models.autoencoder import Autoencoder
    torch.manual_seed(11)
    return Autoencoder(cfg.model.ae, VOCAB, cfg.model.patch_size).eval().requires_grad_(False)


def reference(kind: str):
    """Plain torch, one process, tp = pp = 1: (initial state, per-step losses, norms, states)."""
    from calm_train.models.rng import SampleRNG, sample_seeds
    from calm_train.parallel import runtime
    from calm_train.parallel.ds_config import lr_at
    from calm_train.parallel.engine import param_groups
    from calm_train.train.tasks import task_for
    cfg = config(kind)
    runtime.init_distributed(1, 1, seed=3)
    task = task_for(cfg, frozen_autoencoder(cfg) if kind == "calm" else None)
    model = task.build_model(cfg)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                            eps=t.adam_eps)
    losses, norms, states = [], [], []
    for step, (tokens, ids) in enumerate(batches(), 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad()
        total = 0.0
        chunks = list(zip(tokens.split(MICRO), ids.split(MICRO)))
        for tok, sid in chunks:
            loss = task.loss(model, tok, SampleRNG(sample_seeds(t.seed, step, sid)))
            (loss / len(chunks)).backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)))
        opt.step()
        losses.append(total / len(chunks))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    return initial, losses, norms, states


def engine_for(kind: str, initial: dict, **parallel):
    from calm_train.parallel import runtime
    from calm_train.parallel.engine import TrainEngine, build_world
    from calm_train.train.tasks import task_for
    cfg = config(kind, **parallel)
    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=5)
    world = build_world(cfg)
    task = task_for(cfg, frozen_autoencoder(cfg) if kind == "calm" else None)
    task.init_state = initial
    return TrainEngine(cfg, task, world), world


def my_share(world, tokens, ids):
    per = GLOBAL_BATCH // world.dp_size
    rows = slice(world.dp_rank * per, (world.dp_rank + 1) * per)
    return tokens[rows], ids[rows]


def trajectory(kind: str, initial: dict, **parallel) -> dict:
    """Train STEPS steps in this layout; losses, norms, exported states, eval loss (all ranks agree)."""
    engine, world = engine_for(kind, initial, **parallel)
    losses, norms, states, per_rank_losses = [], [], [], []
    for step, (tokens, ids) in enumerate(batches(), 1):
        result = engine.train_step(*my_share(world, tokens, ids), step)
        assert not result.skipped, (parallel, step)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        states.append(engine.state_for_export())
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, result.loss)
        per_rank_losses.append(gathered)
    eval_loss = engine.eval_loss(*my_share(world, *batches()[0]))
    return {"losses": losses, "norms": norms, "states": states, "per_rank_losses": per_rank_losses,
            "eval": eval_loss}


def frozen_ae_case(initial: dict) -> dict:
    """CALM in TP2 x PP2: the frozen AE is bit-identical after training and owns no optimizer state."""
    engine, world = engine_for("calm", initial, tp=2, pp=2, zero_stage=1)
    ae = engine.task.autoencoder
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    tokens, ids = batches()[0]
    for step in range(1, 3):
        engine.train_step(*my_share(world, tokens, ids), step)
    ae_ids = {id(p) for p in ae.parameters()}
    in_optimizer = sum(id(p) in ae_ids for g in engine.ds.optimizer.param_groups for p in g["params"])
    in_module = sum(id(p) in ae_ids for p in engine.ds.module.parameters())
    state_keys = list(engine.ds.module.state_dict())
    return {"identical": all(torch.equal(before[k], v) for k, v in ae.state_dict().items()),
            "in_optimizer": in_optimizer, "in_module": in_module, "grads": sum(p.grad is not None for p in ae.parameters()),
            "requires_grad": sum(p.requires_grad for p in ae.parameters()),
            "ae_keys_in_module": sum(k.startswith(("encoder", "decoder")) for k in state_keys)}


def optimizer_state_bytes(engine) -> bytes:
    """The torch AdamW state (moments, step counts) under DeepSpeed's ZeRO wrapper, if any."""
    base = getattr(engine.ds.optimizer, "optimizer", engine.ds.optimizer)
    return pickle.dumps(base.state_dict()["state"])


def skip_case(kind: str, initial: dict, **parallel) -> dict:
    """One good step, then a parameter set to inf (so the loss is non-finite): the update is skipped."""
    engine, world = engine_for(kind, initial, **parallel)
    (tokens, ids), _, _ = batches()
    good = engine.train_step(*my_share(world, tokens, ids), 1)
    before = engine.state_for_export()
    opt_before = optimizer_state_bytes(engine)
    weight = engine.model.backbone.decoder.layers[0].mlp.linear_fc2.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("inf"))
    bad = engine.train_step(*my_share(world, tokens, ids), 2)
    with torch.no_grad():
        weight.copy_(saved)
    after = engine.state_for_export()
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    same_opt = optimizer_state_bytes(engine) == opt_before
    again = engine.train_step(*my_share(world, tokens, ids), 2)
    return {"good": good, "bad": bad, "unchanged": unchanged, "same_optimizer_state": same_opt, "again": again}


def resume_case(kind: str, initial: dict, directory: str, **parallel) -> dict:
    """Save after 2 steps, train step 3; a fresh engine loads and trains step 3: identical result."""
    engine, world = engine_for(kind, initial, **parallel)
    data = batches()
    for step in (1, 2):
        engine.train_step(*my_share(world, *data[step - 1]), step)
    engine.save_checkpoint(directory, "step2", {"step": 2})
    first = engine.train_step(*my_share(world, *data[2]), 3)
    first_state = engine.state_for_export()
    engine, world = engine_for(kind, initial, **parallel)
    client = engine.load_checkpoint(directory, "step2")
    second = engine.train_step(*my_share(world, *data[2]), 3)
    second_state = engine.state_for_export()
    return {"client": client.get("step"), "first": first, "second": second,
            "states_equal": all(torch.equal(first_state[k], second_state[k]) for k in first_state)}


LAYOUTS = {
    "tp2_dp2_zero1": dict(tp=2, pp=1, zero_stage=1),
    "pp2_dp2_zero1": dict(tp=1, pp=2, zero_stage=1),
    "tp2_pp2_zero1": dict(tp=2, pp=2, zero_stage=1),
    "tp2_dp2_zero1_sp": dict(tp=2, pp=1, zero_stage=1, sequence_parallel=True),
    "tp2_dp2_zero2": dict(tp=2, pp=1, zero_stage=2),
    "tp2_dp2_zero3": dict(tp=2, pp=1, zero_stage=3),
    "dp4_zero0": dict(tp=1, pp=1, zero_stage=0),
    "dp4_zero2": dict(tp=1, pp=1, zero_stage=2),
    "dp4_zero3": dict(tp=1, pp=1, zero_stage=3),
}
AR_ONLY = ("tp2_dp2_zero3", "dp4_zero0")


def run_all(out_dir: str) -> dict:
    results = {}
    for kind in ("ar", "calm"):
        initial, *ref = reference(kind)
        results[kind, "reference"] = dict(zip(("losses", "norms", "states"), ref))
        for name, layout in LAYOUTS.items():
            if kind == "calm" and name in AR_ONLY:
                continue
            results[kind, name] = trajectory(kind, initial, **layout)
        if kind == "calm":
            results["calm", "frozen_ae"] = frozen_ae_case(initial)
        else:
            results["ar", "skip_zero1"] = skip_case("ar", initial, tp=2, pp=1, zero_stage=1)
            results["ar", "skip_zero0"] = skip_case("ar", initial, tp=1, pp=1, zero_stage=0)
            results["ar", "skip_pp"] = skip_case("ar", initial, tp=1, pp=2, zero_stage=1)
            results["ar", "resume_tp2_pp2"] = resume_case("ar", initial, os.path.join(out_dir, "ck_pp"), tp=2, pp=2,
                                                          zero_stage=1)
            results["ar", "resume_dp4_zero3"] = resume_case("ar", initial, os.path.join(out_dir, "ck_z3"), tp=1, pp=1,
                                                            zero_stage=3)
    return results


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    try:
        results = run_all(out_dir)
        if rank == 0:
            with open(os.path.join(out_dir, "results.pkl"), "wb") as f:
                pickle.dump(results, f)
    except BaseException:
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        from calm_train.parallel import runtime
        runtime.destroy()


def main(out_dir: str) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(worker, args=(port, out_dir), nprocs=WORLD, start_method="spawn")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1])

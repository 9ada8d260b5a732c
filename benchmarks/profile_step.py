"""Where the time of a training step goes: torch.profiler over TrainEngine steps, grouped by module.

    python benchmarks/profile_step.py [--config tiny|small|calm_m|transformer_m|NAME|YAML] [--steps 2]
                                      [--warmup 1] [--seq-len L] [--micro-batch B] [--accumulation A]
                                      [--vocab V] [--set key=value ...] [--threads T] [--out FILE]

Each CPU op and each GPU kernel counts for one group:
  * forward work: the innermost labelled module it ran in; the labels are profiler ranges opened and
    closed by forward hooks that this script puts on the modules (nothing in calm_train/models);
  * backward work: the group of the forward op that created its autograd node (the profiler's
    sequence numbers link `autograd::engine::evaluate_function: XBackward0` to its forward op);
  * the engine's own ranges (`engine.optimizer_step`, `engine.backward`, `engine.forward`) take what
    no module claims: DeepSpeed's step, its gradient hooks and bookkeeping;
  * collectives (NCCL kernels, c10d/gloo ops) are `communication` wherever they run.
Time is self time: GPU kernel time on CUDA (then `GPU idle` = step wall time - kernel time: host
gaps, launch latency, synchronisation), CPU time of the op itself on CPU (then `no op running` =
wall time - op time: Python and framework overhead between ops).  A compiled layer
(perf.compile=on) is one graph: its work shows as `backbone layers (compiled)`.
"""
from __future__ import annotations

import collections
import sys

import common  # first: it sets the environment before anything imports DeepSpeed
import torch
from calm_step import PRESETS  # the tiny and small sizes
from torch.profiler import ProfilerActivity, profile, record_function

from calm_train.config import load_config
from calm_train.models.autoencoder import Autoencoder
from calm_train.parallel import runtime
from calm_train.parallel.engine import TrainEngine, build_world
from calm_train.train.tasks import task_for

PREFIX = "calm/"
ENGINE_RANGES = {"engine.optimizer_step": "optimizer step (DeepSpeed: norm, overflow check, AdamW)",
                 "engine.backward": "backward: gradient accumulation, DeepSpeed hooks",
                 "engine.forward": "forward: outside the labelled modules"}
COMMUNICATION = "communication (collectives)"
OTHER = "other (outside the step's phases)"


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def module_labels(engine) -> list[tuple[torch.nn.Module, str]]:
    """(module, group) pairs of this stage; inner modules win over the ones around them."""
    model, task = engine.model, engine.task
    calm = getattr(model, "generative_head", None) is not None or task.kind == "calm"
    rest = "energy loss, noise and posterior draws" if calm else "loss: cross entropy"
    if "head_loss" in vars(model):                       # compiled CALM.head_loss: the head runs inside it
        rest = "energy head + energy loss (compiled), noise and posterior draws"
    pairs = [(engine.ds.module, rest)]
    if "head_loss" not in vars(model) and getattr(model, "generative_head", None) is not None:
        pairs.append((model.generative_head, f"energy head (x {model.model_cfg.head.num_samples} samples)"))
    if getattr(model, "embed_tokens", None) is not None:
        pairs.append((model.embed_tokens, "input compression" if calm else "token embedding"))
    if getattr(model, "embed_proj", None) is not None:
        pairs.append((model.embed_proj, "input compression"))
    if getattr(model, "lm_head", None) is not None:
        pairs.append((model.lm_head, "output layer (logits)"))
    if task.autoencoder is not None:
        pairs.append((task.autoencoder.encoder, "frozen AE encoder"))
    decoder = model.backbone.decoder
    compiled = any(_compiled(layer) for layer in decoder.layers)
    pairs.append((decoder, "backbone layers (compiled)" if compiled else "backbone: residuals, layer glue"))
    if getattr(decoder, "final_layernorm", None) is not None:
        pairs.append((decoder.final_layernorm, "backbone norms"))
    for layer in decoder.layers:
        if _compiled(layer):
            continue
        pairs += [(layer.input_layernorm, "backbone norms"), (layer.pre_mlp_layernorm, "backbone norms"),
                  (layer.self_attention, "backbone attention: q/k/v, output projections, RoPE"),
                  (layer.self_attention.core_attention, "backbone attention: core (softmax(qk^T)v)"),
                  (layer.mlp, "backbone MLP (SwiGLU)")]
    return pairs


def attach_ranges(engine) -> list:
    """Forward hooks that open and close a profiler range named after each module's group."""
    handles = []
    for module, label in module_labels(engine):
        stack = []

        def enter(_module, _inputs, name=PREFIX + label, stack=stack):
            scope = record_function(name)
            scope.__enter__()
            stack.append(scope)

        def leave(_module, _inputs, _output, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _is_collective(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(("nccl", "c10d::", "gloo", "record_param_comms")) or "ncclkernel" in lowered \
        or "ncclDevKernel".lower() in lowered


def group_events(events, device_type: str) -> dict[str, float]:
    """Self time in microseconds per group (module docstring): kernel time on CUDA, CPU time on CPU."""
    def ancestors(event):
        while event is not None:
            yield event
            event = event.cpu_parent

    def label_of(event, by_seq) -> str:
        for up in ancestors(event):
            if up.name.startswith(PREFIX):
                return up.name[len(PREFIX):]
            if up.name.startswith("autograd::engine::evaluate_function") and (up.fwd_thread, up.sequence_nr) in by_seq:
                return by_seq[(up.fwd_thread, up.sequence_nr)]
            if up.name in ENGINE_RANGES:
                return ENGINE_RANGES[up.name]
        return OTHER

    cpu_events = [e for e in events if e.device_type.name == "CPU"]
    by_seq = {}
    for event in cpu_events:          # forward ops that created autograd nodes -> their module's group
        if event.sequence_nr >= 0 and not any(up.name.startswith("autograd::engine::evaluate_function")
                                              for up in ancestors(event)):
            label = label_of(event, {})
            if label not in ENGINE_RANGES.values() and label != OTHER:
                by_seq[(event.thread, event.sequence_nr)] = label
    totals: dict[str, float] = collections.defaultdict(float)
    for event in cpu_events:
        if getattr(event, "is_user_annotation", False) and device_type == "cuda":
            continue                  # a range has no kernels of its own
        label = COMMUNICATION if _is_collective(event.name) else label_of(event, by_seq)
        if device_type == "cuda":
            for kernel in event.kernels:
                totals[COMMUNICATION if _is_collective(kernel.name) else label] += kernel.duration
        else:
            totals[label] += event.self_cpu_time_total
    return dict(totals)


def top_ops(events, device_type: str, n: int = 12) -> list[dict]:
    """The n most expensive ops (CPU) or kernels (CUDA) by self time, summed over calls."""
    totals = collections.Counter()
    for event in events:
        if event.device_type.name != "CPU":
            continue
        if device_type == "cuda":
            for kernel in event.kernels:
                totals[kernel.name] += kernel.duration
        elif not getattr(event, "is_user_annotation", False):
            totals[event.name] += event.self_cpu_time_total
    return [{"name": name[:120], "us": us} for name, us in totals.most_common(n)]


def profile_steps(engine, batch, first_step: int, steps: int) -> dict:
    """Profile `steps` optimizer steps (after the caller's warm-up); per-step milliseconds per group."""
    device = engine.world.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = attach_ranges(engine)
    try:
        common.sync(device)
        with profile(activities=activities) as prof:
            for step in range(first_step, first_step + steps):
                with record_function(PREFIX + "step"):
                    engine.train_step(*batch, step)
                    common.sync(device)
        events = prof.events()
    finally:
        for handle in handles:
            handle.remove()
    wall_us = sum(e.cpu_time_total for e in events if e.name == PREFIX + "step" and e.device_type.name == "CPU")
    totals = group_events(events, device.type)
    totals.pop("step", None)          # the step range's own self time: Python between the engine's phases
    busy_us = sum(totals.values())
    idle = "GPU idle (host gaps, launches, syncs)" if device.type == "cuda" else "no op running (Python, framework)"
    totals[idle] = max(0.0, wall_us - busy_us)
    rows = [{"group": g, "ms_per_step": us / 1e3 / steps, "share": us / wall_us if wall_us else None}
            for g, us in sorted(totals.items(), key=lambda kv: -kv[1])]
    return {"steps": steps, "wall_ms_per_step": wall_us / 1e3 / steps, "measure": "GPU kernel time" if
            device.type == "cuda" else "CPU self time of ops", "groups": rows, "top": top_ops(events, device.type)}


def print_profile(result: dict, title: str) -> str:
    text = common.print_table(result["groups"], [("group", "group", "s"), ("ms_per_step", "ms/step", ".2f"),
                                                 ("share", "share", ".1%")],
                              title=f"{title}: {result['wall_ms_per_step']:.1f} ms/step wall, {result['measure']}")
    top = common.print_table(result["top"], [("name", "top ops/kernels", "s"), ("us", "us (all steps)", ",.0f")])
    return text + "\n" + top


def build_config(args):
    base, overrides, seq_len, micro = PRESETS.get(args.config, (args.config, [], 256, 4))
    seq_len, micro = args.seq_len or seq_len, args.micro_batch or micro
    cfg = load_config(base, [*overrides, f"model.vocab_size={args.vocab}", f"data.seq_len={seq_len}",
                             f"train.micro_batch={micro}", f"train.global_batch={micro * args.accumulation}",
                             "train.warmup_steps=0", "model.autoencoder=random-frozen", *args.set])
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "profile_step")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--seq-len", type=int, default=0)
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    cfg = build_config(args)
    with runtime.single_process(seed=0):
        world = build_world(cfg)
        autoencoder = None
        if cfg.model.kind == "calm":
            torch.manual_seed(1)
            autoencoder = Autoencoder(cfg.model.ae, cfg.model.vocab_size, cfg.model.patch_size).to(world.device)
        engine = TrainEngine(cfg, task_for(cfg, autoencoder), world)
        print(f"profile_step: {engine.describe()}", flush=True)
        gen = torch.Generator().manual_seed(0)
        batch = (torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.data.seq_len), generator=gen),
                 torch.arange(cfg.train.global_batch))
        for step in range(1, args.warmup + 1):
            engine.train_step(*batch, step)
        result = profile_steps(engine, batch, args.warmup + 1, args.steps)
    title = f"profile_step [{args.config}] {cfg.model.kind} micro {cfg.train.micro_batch} x {args.accumulation}"
    print_profile(result, title)
    common.write_json(args.out, {"argv": sys.argv, "machine": common.machine(), "engine": engine.describe(),
                                 "config": args.config, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

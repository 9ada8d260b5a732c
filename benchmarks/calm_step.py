"""CALM training step: the project's engine vs a straightforward PyTorch step with the reference energy loss.

    python benchmarks/calm_step.py [--config tiny|small|NAME|YAML] [--seq-len L] [--micro-batch B]
                                   [--accumulation A] [--vocab V] [--steps S] [--warmup W]
                                   [--variants engine plain reference] [--set key=value ...] [--out FILE]

One random frozen autoencoder, one batch of random tokens and the same initial weights (same seed)
for every variant, in one process:

  engine     the project: calm_train.parallel.engine.TrainEngine (DeepSpeed, ZeRO stage of the
             config, AdamW, clipping) training CALM with calm_train.models.energy.energy_score
             (pairwise distances from ||x||^2 + ||y||^2 - 2 x.y: [P, N, M] tensors only)
  plain      the same CALM modules and loss, stepped by plain torch.optim.AdamW + clip_grad_norm_
  reference  the baseline: plain AdamW, and the loss as the reference release computes it,
             ||x_n - y_m|| = torch.linalg.norm(x[:, None] - y[None], dim=-1) on samples laid out
             [N, P, D] and [M, P, D]: the [N, M, P, D] and [N, N, P, D] difference tensors exist
             (and are kept for backward)

P = micro_batch x (seq_len / K - 1) predicted positions.  Reported per variant: median step time
after warm-up, trained tokens/s (global_batch x seq_len per step), peak memory of one more step
(benchmarks/common.py: CUDA allocator peak, or on CPU the torch.profiler allocation peak), the
first step's loss (equal across variants up to float rounding: same weights, data and noise).
Ratios engine/reference and plain/reference separate the engine from the loss formulation.
"""
from __future__ import annotations

import gc
import math
import sys

import common  # first: it sets the environment before anything imports DeepSpeed
import torch

from calm_train.config import load_config
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.rng import SampleRNG, sample_seeds
from calm_train.parallel import runtime
from calm_train.parallel.engine import TrainEngine, build_world, param_groups
from calm_train.train.tasks import task_for

# Named sizes: (base config, overrides, default seq_len, default micro_batch).  "small" has the backbone of
# benchmarks/train_throughput.py and the paper's latent size (128), noise size and head depth.
PRESETS = {
    "tiny": ("tiny_calm", [], 64, 4),
    "small": ("tiny_calm", ["model.backbone.hidden_size=256", "model.backbone.intermediate_size=688",
                            "model.backbone.num_layers=4", "model.backbone.num_heads=8",
                            "model.ae.hidden_size=128", "model.ae.intermediate_size=256", "model.ae.latent_size=128",
                            "model.head.num_blocks=4", "model.head.noise_size=64"], 256, 4),
}
VARIANTS = ("engine", "plain", "reference")


def build_config(args):
    base, overrides, seq_len, micro = PRESETS.get(args.config, (args.config, [], 256, 4))
    seq_len, micro = args.seq_len or seq_len, args.micro_batch or micro
    device_dtype = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = load_config(base, [*overrides, f"model.vocab_size={args.vocab}", f"data.seq_len={seq_len}",
                             f"train.micro_batch={micro}", f"train.global_batch={micro * args.accumulation}",
                             "train.warmup_steps=0", f"train.dtype={device_dtype}",
                             "model.autoencoder=random-frozen", *args.set])
    if cfg.model.kind != "calm":
        raise SystemExit(f"calm_step.py: config '{args.config}' has model.kind={cfg.model.kind}; pass a CALM config")
    return cfg


def reference_energy_loss(model, hidden_SBH: torch.Tensor, tokens_BL: torch.Tensor, rng: SampleRNG,
                          autoencoder: Autoencoder) -> torch.Tensor:
    """CALM.loss_from_hidden with the reference release's energy score (same draws, in the same order)."""
    head = model.model_cfg.head
    hidden_BTH = hidden_SBH.transpose(0, 1)[:, :-1]
    with torch.no_grad():
        targets_BTMD = autoencoder.posterior_samples(model.chunks(tokens_BL)[:, 1:], head.num_target_samples, rng)
    samples_BTND = model.generative_head.sample(hidden_BTH, head.num_samples, rng)
    x_NPD = samples_BTND.flatten(0, 1).transpose(0, 1).float()
    y_MPD = targets_BTMD.flatten(0, 1).transpose(0, 1).float()
    N = x_NPD.shape[0]

    def distance(a, b):
        return torch.linalg.norm(a - b, ord=2, dim=-1) ** head.beta

    spread_P = distance(x_NPD[:, None], x_NPD[None]).sum(dim=(0, 1)) / (N * (N - 1))     # via [N, N, P, D]
    fit_P = distance(x_NPD[:, None], y_MPD[None]).mean(dim=(0, 1))                      # via [N, M, P, D]
    return (2 * fit_P - spread_P).mean()


class PlainTrainer:
    """The CALM model + torch AdamW (decay on matrices only, as the engine) + global-norm clipping."""

    def __init__(self, cfg, task, device: torch.device, loss: str):
        self.cfg, self.task, self.device, self.loss_kind = cfg, task, device, loss
        dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        self.model = task.build_model(cfg, params_dtype=dtype).to(device)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)

    def loss(self, tokens_BL: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        if self.loss_kind == "project":
            return self.task.loss(self.model, tokens_BL, rng)
        hidden_SBH = self.model.backbone(self.model.embed(tokens_BL))
        return reference_energy_loss(self.model, hidden_SBH, tokens_BL, rng, self.task.autoencoder)

    def train_step(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor, step: int) -> float:
        micro = self.cfg.train.micro_batch
        pieces = list(zip(tokens_BL.to(self.device).split(micro), sample_ids.split(micro)))
        total = 0.0
        for tokens, ids in pieces:
            loss = self.loss(tokens, SampleRNG(sample_seeds(self.cfg.train.seed, step, ids), self.device))
            (loss / len(pieces)).backward()
            total += float(loss.detach()) / len(pieces)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


class EngineTrainer:
    def __init__(self, cfg, task):
        self.engine = TrainEngine(cfg, task, build_world(cfg))
        self.model = self.engine.model

    def train_step(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor, step: int) -> float:
        return self.engine.train_step(tokens_BL, sample_ids, step).loss


def make_trainer(variant: str, cfg, task, device: torch.device):
    runtime.seed_all(cfg.train.seed)                # identical initial weights for every variant
    if variant == "engine":
        return EngineTrainer(cfg, task), f"TrainEngine (DeepSpeed ZeRO-{cfg.parallel.zero_stage}) + energy_score"
    if variant == "plain":
        return PlainTrainer(cfg, task, device, "project"), "torch AdamW + energy_score"
    return PlainTrainer(cfg, task, device, "reference"), "torch AdamW + reference loss (materialised)"


def measure(variants: list[str], cfg, task, device: torch.device, args) -> list[dict]:
    """Build every variant's trainer, time their steps in turns, then one peak-memory step each."""
    t = cfg.train
    gen = torch.Generator().manual_seed(0)
    tokens_BL = torch.randint(0, cfg.model.vocab_size, (t.global_batch, cfg.data.seq_len), generator=gen)
    sample_ids = torch.arange(t.global_batch)
    trainers, labels, losses, steps = {}, {}, {}, {}
    for variant in variants:
        trainers[variant], labels[variant] = make_trainer(variant, cfg, task, device)
        losses[variant], steps[variant] = [], iter(range(1, 1 << 30))

    def step_fn(variant: str):
        def train_step():
            losses[variant].append(trainers[variant].train_step(tokens_BL, sample_ids, next(steps[variant])))
        return train_step

    fns = {variant: step_fn(variant) for variant in variants}
    timing = common.time_interleaved(fns, device, iters=args.steps, warmup=args.warmup)
    tokens = t.global_batch * cfg.data.seq_len
    rows = []
    for variant in variants:
        _, memory = common.peak_memory(fns[variant], device)
        row = {"variant": variant, "trainer": labels[variant], "step_s": timing[variant]["median_s"],
               "step_s_all": timing[variant]["all_s"], "step_cpu_s": timing[variant]["cpu_median_s"],
               "tokens_per_s": tokens / timing[variant]["median_s"],
               "tokens_per_cpu_s": tokens / timing[variant]["cpu_median_s"],
               "peak_mib": memory["peak_bytes"] / common.MIB, "memory_method": memory["method"],
               "first_loss": losses[variant][0], "losses": losses[variant],
               "losses_finite": all(math.isfinite(x) for x in losses[variant]),
               "params": sum(p.numel() for p in trainers[variant].model.parameters())}
        for key in ("peak_rss_bytes", "peak_total_bytes"):
            if memory.get(key) is not None:
                row[key.replace("_bytes", "_mib")] = memory[key] / common.MIB
        rows.append(row)
        print(f"  {variant}: {row['step_s']:.3f} s/step, {row['peak_mib']:.1f} MiB peak", flush=True)
    return rows


def compare(rows: list[dict]) -> dict:
    """Each row's ratios to the reference row (wall and CPU-time speed, allocator and RSS peak)."""
    base = next((row for row in rows if row["variant"] == "reference"), None)
    if base is None:
        return {}
    for row in rows:
        row["speedup_vs_reference"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["cpu_speedup_vs_reference"] = row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        row["memory_vs_reference"] = row["peak_mib"] / base["peak_mib"] if base["peak_mib"] else None
        if base.get("peak_rss_mib"):
            row["rss_vs_reference"] = row["peak_rss_mib"] / base["peak_rss_mib"]
        row["first_loss_diff_vs_reference"] = abs(row["first_loss"] - base["first_loss"])
    return {f"{row['variant']}_vs_reference": {key: row.get(f"{key}_vs_reference") for key in
                                               ("speedup", "cpu_speedup", "memory", "rss")}
            for row in rows if row is not base}


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "calm_step")
    parser.add_argument("--config", default="tiny", help=f"one of {list(PRESETS)}, a config name or a YAML path")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0: the preset's)")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per forward (0: the preset's)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    cfg = build_config(args)
    m, t = cfg.model, cfg.train
    device = runtime.pick_device()[0]
    positions = t.micro_batch * (cfg.data.seq_len // m.patch_size - 1)
    materialised = m.head.num_samples * (m.head.num_target_samples + m.head.num_samples) * positions * m.ae.latent_size
    setup = {"config": args.config, "seq_len": cfg.data.seq_len, "micro_batch": t.micro_batch,
             "global_batch": t.global_batch, "vocab_size": m.vocab_size, "patch_size": m.patch_size,
             "backbone": vars(m.backbone), "head": vars(m.head), "autoencoder": vars(m.ae), "dtype": t.dtype,
             "zero_stage": cfg.parallel.zero_stage, "positions_per_micro_batch": positions,
             "reference_difference_tensors_mib": 4 * materialised / common.MIB}
    print(f"calm_step: {args.config} on {device}: seq {cfg.data.seq_len}, micro-batch {t.micro_batch} x "
          f"{args.accumulation}, N={m.head.num_samples} M={m.head.num_target_samples} D={m.ae.latent_size}, "
          f"P={positions}; reference difference tensors {setup['reference_difference_tensors_mib']:.0f} MiB", flush=True)
    with runtime.single_process(seed=t.seed):
        torch.manual_seed(1)
        autoencoder = Autoencoder(m.ae, m.vocab_size, m.patch_size, m.init_std).to(device)
        task = task_for(cfg, autoencoder)
        rows = measure(args.variants, cfg, task, device, args)
    ratios = compare(rows)
    info = common.machine()
    table = common.print_table(rows, [
        ("variant", "variant", "s"), ("trainer", "trainer", "s"), ("step_s", "s/step", ".3f"),
        ("tokens_per_s", "tokens/s", ",.0f"), ("speedup_vs_reference", "x ref", ".2f"),
        ("tokens_per_cpu_s", "tok/cpu-s", ",.0f"), ("cpu_speedup_vs_reference", "x ref", ".2f"), ("peak_mib", "alloc peak MiB", ".1f"),
        ("memory_vs_reference", "x ref", ".2f"), ("peak_rss_mib", "RSS peak MiB", ".1f"),
        ("first_loss", "loss@1", ".5f")],
        title=f"calm_step [{args.config}] on {info['device']}, {info['torch_threads']} threads, load "
              f"{info['load_avg_1_5_15'][0]:.1f}; alloc peak: {rows[0]['memory_method']}")
    common.write_json(args.out, {"benchmark": "calm_step", "machine": info, "setup": setup, "rows": rows,
                                 "ratios": ratios, "table": table, "argv": sys.argv[1:] if argv is None else argv})
    return 0 if all(row["losses_finite"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generation speed: CALM (K tokens per step) vs the AR baseline on the same backbone, with and without KV cache.

    python benchmarks/generation.py [--config tiny|small|NAME|YAML] [--vocab V] [--prompt-len P]
                                    [--new-tokens N] [--temperatures 0 0.5] [--num-samples S]
                                    [--repeats R] [--warmup W] [--set key=value ...] [--out FILE]

Random weights (speed does not depend on training): a frozen autoencoder, CALM and an AR model
(`model.kind=ar` on the same config: same backbone, embedding and untied vocabulary head instead of
the input compression and energy head).  One random prompt of P tokens, batch 1, through
calm_train.models.generate.generate_calm / generate_ar for every temperature (0 = greedy; CALM: the
most frequent of S decoded head samples; 0.5: the approximate sampler over a pool of S) with
use_cache on and off.  The cases take turns (benchmarks/common.py time_interleaved).  Reported:
new tokens/s (wall, and per CPU-second of the process: steadier on a shared machine), the cache's
speed-up (no-cache time / cache time), CALM's speed over AR's for the same temperature and cache
setting, and whether cached and uncached runs gave the same tokens.
"""
from __future__ import annotations

import sys

import common  # first: it sets the environment before anything imports DeepSpeed
import torch

from calm_train.config import load_config
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.generate import generate_ar, generate_calm
from calm_train.parallel import runtime
from calm_train.train.tasks import task_for

# Named sizes: (base config, overrides); "small" is the backbone of calm_step.py / train_throughput.py.
PRESETS = {
    "tiny": ("tiny_calm", []),
    "small": ("tiny_calm", ["model.backbone.hidden_size=256", "model.backbone.intermediate_size=688",
                            "model.backbone.num_layers=4", "model.backbone.num_heads=8",
                            "model.ae.hidden_size=128", "model.ae.intermediate_size=256", "model.ae.latent_size=128",
                            "model.head.num_blocks=4", "model.head.noise_size=64"]),
}
PAD_ID = 0


def build_configs(args):
    base, overrides = PRESETS.get(args.config, (args.config, []))
    common_overrides = [*overrides, f"model.vocab_size={args.vocab}", "model.autoencoder=random-frozen", *args.set]
    return load_config(base, [*common_overrides, "model.kind=calm"]), load_config(base, [*common_overrides, "model.kind=ar"])


def build_models(calm_cfg, ar_cfg, device: torch.device):
    m = calm_cfg.model
    torch.manual_seed(1)
    autoencoder = Autoencoder(m.ae, m.vocab_size, m.patch_size, m.init_std).to(device)
    runtime.seed_all(0)
    calm = task_for(calm_cfg, autoencoder).build_model(calm_cfg).to(device).eval()
    runtime.seed_all(0)
    ar = task_for(ar_cfg).build_model(ar_cfg).to(device).eval()
    return autoencoder, calm, ar


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "generation")
    parser.add_argument("--config", default="tiny", help=f"one of {list(PRESETS)}, a config name or a YAML path")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--num-samples", type=int, default=64, help="CALM head samples decoded per step")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    calm_cfg, ar_cfg = build_configs(args)
    device = runtime.pick_device()[0]
    prompt = torch.randint(1, args.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    outputs: dict[tuple, list[int]] = {}
    with runtime.single_process(seed=0):
        autoencoder, calm, ar = build_models(calm_cfg, ar_cfg, device)

        def case(model: str, temperature: float, cache: bool):
            def run():
                if model == "calm":
                    new = generate_calm(calm, autoencoder, prompt, args.new_tokens, temperature, seed=0, pad_id=PAD_ID,
                                        use_cache=cache, num_samples=args.num_samples)
                else:
                    new = generate_ar(ar, prompt, args.new_tokens, temperature, seed=0, use_cache=cache)
                outputs[model, temperature, cache] = new
            return run

        keys = [(model, temperature, cache) for model in ("calm", "ar") for temperature in args.temperatures
                for cache in (True, False)]
        timing = common.time_interleaved({key: case(*key) for key in keys}, device, args.repeats, args.warmup)
        params = {"calm": sum(p.numel() for p in calm.parameters()), "ar": sum(p.numel() for p in ar.parameters()),
                  "autoencoder": sum(p.numel() for p in autoencoder.parameters())}
    rows = []
    for model, temperature, cache in keys:
        seconds = timing[model, temperature, cache]["median_s"]
        steps = -(-args.new_tokens // calm_cfg.model.patch_size) if model == "calm" else args.new_tokens
        rows.append({"model": model, "temperature": temperature, "kv_cache": cache, "new_tokens": args.new_tokens,
                     "steps": steps, "seconds": seconds, "seconds_all": timing[model, temperature, cache]["all_s"],
                     "cpu_seconds": timing[model, temperature, cache]["cpu_median_s"],
                     "new_tokens_per_s": args.new_tokens / seconds,
                     "new_tokens_per_cpu_s": args.new_tokens / timing[model, temperature, cache]["cpu_median_s"],
                     "ms_per_step": 1e3 * seconds / steps,
                     "cache_speedup": timing[model, temperature, False]["median_s"] / seconds if cache else None,
                     "cache_cpu_speedup": (timing[model, temperature, False]["cpu_median_s"]
                                           / timing[model, temperature, True]["cpu_median_s"]) if cache else None,
                     "cache_tokens_equal": outputs[model, temperature, True] == outputs[model, temperature, False],
                     "calm_vs_ar": (timing["ar", temperature, cache]["median_s"] / seconds) if model == "calm" else None,
                     "calm_vs_ar_cpu": (timing["ar", temperature, cache]["cpu_median_s"]
                                        / timing[model, temperature, cache]["cpu_median_s"]) if model == "calm" else None})
    info = common.machine()
    table = common.print_table(rows, [
        ("model", "model", "s"), ("temperature", "T", ".1f"), ("kv_cache", "cache", ""), ("steps", "steps", "d"),
        ("seconds", "s", ".3f"), ("new_tokens_per_s", "new tok/s", ",.1f"), ("ms_per_step", "ms/step", ".1f"),
        ("new_tokens_per_cpu_s", "new tok/cpu-s", ",.1f"), ("cache_speedup", "cache x", ".2f"),
        ("cache_cpu_speedup", "cache x cpu", ".2f"), ("calm_vs_ar", "CALM/AR x", ".2f"),
        ("calm_vs_ar_cpu", "CALM/AR x cpu", ".2f"),
        ("cache_tokens_equal", "same tokens", "")],
        title=f"generation [{args.config}] on {info['device']}, {info['torch_threads']} threads, load "
              f"{info['load_avg_1_5_15'][0]:.1f}; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
              f"K={calm_cfg.model.patch_size}, CALM samples/step {args.num_samples}")
    setup = {"config": args.config, "vocab_size": args.vocab, "prompt_len": args.prompt_len,
             "new_tokens": args.new_tokens, "num_samples": args.num_samples, "patch_size": calm_cfg.model.patch_size,
             "backbone": vars(calm_cfg.model.backbone), "head": vars(calm_cfg.model.head),
             "autoencoder": vars(calm_cfg.model.ae), "params": params}
    common.write_json(args.out, {"benchmark": "generation", "machine": info, "setup": setup, "rows": rows,
                                 "table": table, "argv": sys.argv[1:] if argv is None else argv})
    return 0 if all(row["cache_tokens_equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

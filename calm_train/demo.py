"""`calm-train demo`: the whole pipeline on the embedded corpus, on a laptop CPU, in minutes.

embedded corpus -> byte-level BPE -> MDS shards -> autoencoder -> CALM (K=4) -> AR baseline at
matched training FLOPs -> BrierLM of both on held-out text -> a sample at temperature 0.5.
Every stage calls the same commands a cluster run uses (prepare, train, eval, generate).
Writes OUT/summary.json and OUT/curves.png.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

from calm_train.config import load_config

VOCAB = 2048
SEQ_LEN = 64
PROMPT = "The module provides"
EVAL_SAMPLES = 16        # CALM head samples per held-out position: the U-statistic Brier estimate
NOT_LEARNING = ("CALM has not started to learn at this budget (BrierLM within 2 standard errors of 0 or most "
                "decoded samples not real chunks). The learning study (README, 'Where a small CALM starts to learn'; "
                "benchmarks/learning.py) found no setting that learns within the demo's 10 minutes on 2 CPU cores.")


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def prepare(out: pathlib.Path) -> pathlib.Path:
    from data_prep.cli import main as prepare_main
    from data_prep.embedded import write_corpus_jsonl
    data = out / "data"
    if (data / "dataset.json").is_file():
        return data
    corpus = write_corpus_jsonl(out / "corpus.jsonl")
    say(f"embedded corpus: {corpus.stat().st_size / 1e6:.2f} MB of Python documentation -> {data}")
    code = prepare_main(["--input", str(corpus), "--tokenizer", f"train:{VOCAB}", "--out", str(data),
                 "--seq-len", str(SEQ_LEN), "--patch-size", "4", "--val-fraction", "0.05"])
    if code != 0:
        raise SystemExit(code)
    return data


def train(name: str, run_dir: pathlib.Path, overrides: list[str]) -> pathlib.Path:
    from calm_train.train.loop import run_training
    cfg = load_config(name, [f"run_dir={run_dir}", "logging.progress=true", *overrides])
    say(f"training {cfg.model.kind}: {cfg.train.steps} steps -> {run_dir}")
    code = run_training(cfg)
    if code != 0:
        raise SystemExit(code)
    return run_dir


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def total_flops(run_dir: pathlib.Path) -> float:
    return read_jsonl(run_dir / "metrics.jsonl")[-1]["flops"]


def plot_curves(out: pathlib.Path, runs: dict[str, pathlib.Path]) -> pathlib.Path:
    """Training loss, held-out Brier-1 and BrierLM of each model against its training FLOPs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, run_dir in runs.items():
        rows = read_jsonl(run_dir / "metrics.jsonl")
        axes[0].plot([r["flops"] for r in rows], [r["loss"] for r in rows], label=label)
    axes[0].set(xlabel="training FLOPs", ylabel="training loss", title="Training loss (each model's own objective)",
                yscale="log")
    for ax, key, title in ((axes[1], "brier1", "Held-out Brier-1 (higher is better), +-2 SE"),
                           (axes[2], "brierlm", "Held-out BrierLM (x100, higher is better), +-2 SE")):
        for label, run_dir in runs.items():
            flops_at = {r["step"]: r["flops"] for r in read_jsonl(run_dir / "metrics.jsonl")}
            rows = [r for r in read_jsonl(run_dir / "eval.jsonl") if key in r]
            if rows:
                ax.errorbar([flops_at[r["step"]] for r in rows], [r[key] for r in rows],
                            yerr=[2 * (r.get(f"{key}_se") or 0) for r in rows], marker="o", capsize=2, label=label)
        ax.set(xlabel="training FLOPs", title=title)
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calm_learns(calm_eval: dict) -> bool:
    """The demo's test of learning: BrierLM above two standard errors with no Brier-n near 0, and most
    decoded samples real chunks of the training text."""
    return (calm_eval["brierlm"] > 2 * calm_eval["brierlm_se"] and not calm_eval["brier_near_zero"]
            and calm_eval["real_chunk_fraction"] > 0.5)


def run_demo(out_dir: str = "demo_out") -> int:
    from calm_train.train.inference import evaluate_checkpoint, generate_text
    start = time.monotonic()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out)
    common = [f"data.train={data}"]
    ae = train("demo_autoencoder", out / "autoencoder", common)
    calm = train("demo_calm", out / "calm", common + [f"model.autoencoder={ae}"])
    calm_flops = total_flops(calm)
    from calm_train.data.dataset_info import read_dataset_info
    from calm_train.train.flops import train_flops_per_token
    ar_cfg = load_config("demo_ar", common)
    ar_cfg.model.vocab_size = read_dataset_info(data).vocab_size
    ar_flops_per_step = train_flops_per_token(ar_cfg.model, SEQ_LEN) * ar_cfg.train.global_batch * SEQ_LEN
    ar_steps = max(1, round(calm_flops / ar_flops_per_step))
    say(f"AR baseline at matched training FLOPs: {ar_steps} steps")
    ar = train("demo_ar", out / "ar", common + [f"train.steps={ar_steps}",
                                              f"train.eval_every={max(1, ar_steps // 4)}"])
    say("evaluating on held-out text")
    ae_eval = evaluate_checkpoint(str(ae))
    calm_eval = evaluate_checkpoint(str(calm), samples=EVAL_SAMPLES)
    ar_eval = evaluate_checkpoint(str(ar))
    sample = generate_text(str(calm), PROMPT, temperature=0.5, max_new_tokens=48, seed=0)
    curves = plot_curves(out, {"autoencoder": ae, "CALM (K=4)": calm, "AR baseline": ar})
    summary = {
        "ae_recon_acc": ae_eval["recon_acc"],
        "calm_brierlm": calm_eval["brierlm"], "ar_brierlm": ar_eval["brierlm"],
        "calm_brier": [calm_eval[f"brier{n}"] for n in range(1, 5)],
        "ar_brier": [ar_eval[f"brier{n}"] for n in range(1, 5)],
        "calm_brierlm_se": calm_eval["brierlm_se"], "ar_brierlm_se": ar_eval["brierlm_se"],
        "calm_brier_se": [calm_eval[f"brier{n}_se"] for n in range(1, 5)],
        "ar_brier_se": [ar_eval[f"brier{n}_se"] for n in range(1, 5)],
        "calm_brier_samples": EVAL_SAMPLES, "calm_brier_near_zero": calm_eval["brier_near_zero"],
        "calm_real_chunk_fraction": calm_eval["real_chunk_fraction"],
        "heldout_real_chunk_fraction": calm_eval["heldout_real_chunk_fraction"],
        "calm_energy": calm_eval["energy"], "calm_energy_marginal": calm_eval["energy_marginal"],
        "calm_energy_oracle": calm_eval["energy_oracle"], "calm_energy_position": calm_eval["energy_position"],
        "calm_learns": calm_learns(calm_eval),
        "calm_train_flops": calm_flops, "ar_train_flops": total_flops(ar),
        "flops_ratio_ar_over_calm": total_flops(ar) / calm_flops,
        "prompt": PROMPT, "sample_text": sample, "sample_temperature": 0.5,
        "curves": str(curves), "wall_s": round(time.monotonic() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"autoencoder reconstruction accuracy {summary['ae_recon_acc']:.4f}")
    say(f"BrierLM (+- SE): CALM {summary['calm_brierlm']:.3g} +- {summary['calm_brierlm_se']:.2g}  "
        f"AR {summary['ar_brierlm']:.3g} +- {summary['ar_brierlm_se']:.2g} "
        f"(training FLOPs {calm_flops:.3g} vs {summary['ar_train_flops']:.3g})")
    say(f"CALM: {100 * summary['calm_real_chunk_fraction']:.1f}% of decoded samples are real chunks of the training "
        f"text; energy {summary['calm_energy']:.2f} between the random-chunk marginal "
        f"{summary['calm_energy_marginal']:.2f} and the true-chunk oracle {summary['calm_energy_oracle']:.2f} "
        f"(position {summary['calm_energy_position']:.3f}: 0 = marginal, 1 = oracle)")
    if not summary["calm_learns"]:
        say(NOT_LEARNING)
    say(f"sample (T=0.5): {PROMPT!r} -> {sample!r}")
    say(f"wrote {out / 'summary.json'} and {curves} in {summary['wall_s']:.0f}s")
    return 0 if math.isfinite(summary["calm_brierlm"]) else 1

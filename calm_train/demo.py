"""`calm-train demo`: the whole pipeline on the embedded corpus, on a laptop CPU, in minutes.

First a known answer: the `cycle` language of the synthetic ladder (data_prep/synthetic/rungs.py), whose
optimal BrierLM on held-out text is computed exactly -> its autoencoder -> CALM -> AR baseline at matched
training FLOPs -> both models' BrierLM next to the optimum (a CALM that does not learn shows here).
Then real text: embedded corpus -> byte-level BPE -> MDS shards -> autoencoder -> CALM (K=4) -> AR baseline
at matched training FLOPs -> BrierLM of both on held-out text -> a sample at temperature 0.5.
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
# the known-answer stage: a small autoencoder (the language has 24 syllables) and 200 CALM steps, ~1 minute
KNOWN_RUNG = "cycle"
KNOWN_TOKENS, KNOWN_VAL_TOKENS = 200_000, 4_000
KNOWN_AE = ["model.ae.hidden_size=128", "model.ae.intermediate_size=256"]
KNOWN_AE_STEPS, KNOWN_CALM_STEPS = 100, 200
KNOWN_EVAL = ["train.eval_batches=2"]      # two in-run evaluations of 2 batches each (the final one scores all)
NOT_LEARNING = ("CALM has not started to learn real text at this budget (BrierLM within 2 standard errors of 0 or "
                "most decoded samples not real chunks). The learning "
                "ladder (README, 'Where CALM learns'; benchmarks/learning_ladder.py) measures where it falls off: "
                "languages with many distinct chunks need far more FLOPs than AR.")


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


def prepare_known(out: pathlib.Path) -> pathlib.Path:
    """The known-answer language's corpus (seed 0) prepared with its own tokenizer and language file."""
    from data_prep.cli import main as prepare_main
    from data_prep.corpus import write_synthetic
    from data_prep.synthetic.rungs import LADDER
    data = out / "data"
    if (data / "dataset.json").is_file():
        return data
    corpus = out / "corpus.jsonl"
    write_synthetic(str(corpus), KNOWN_RUNG, 0, KNOWN_TOKENS, KNOWN_VAL_TOKENS)
    say(f"known answer: the synthetic language {KNOWN_RUNG!r} ({LADDER[KNOWN_RUNG][2]}) -> {data}")
    code = prepare_main(["--input", str(corpus), "--val-input", str(out / "corpus.val.jsonl"),
                         "--tokenizer", str(out / "corpus.tokenizer.json"), "--out", str(data),
                         "--seq-len", str(SEQ_LEN), "--patch-size", "4"])
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


def plot_curves(out: pathlib.Path, runs: dict[str, pathlib.Path], finals: dict[str, dict],
                known_runs: dict[str, pathlib.Path], known: dict) -> pathlib.Path:
    """Real text: training loss and held-out Brier-1 against training FLOPs, and the final held-out BrierLM the
    summary reports; the known answer: held-out BrierLM during training, its final value and the optimum."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    loss, brier1, known_ax, final_ax = axes.flat
    for label, run_dir in runs.items():
        rows = read_jsonl(run_dir / "metrics.jsonl")
        loss.plot([r["flops"] for r in rows], [r["loss"] for r in rows], label=label)
    loss.set(xlabel="training FLOPs", ylabel="training loss", title="Real text: training loss (each model's objective)",
             yscale="log")
    eval_curves(brier1, {k: v for k, v in runs.items() if k in finals}, "brier1", finals)
    brier1.set(xlabel="training FLOPs", title="Real text: held-out Brier-1 (higher is better), +-2 SE")
    eval_curves(known_ax, known_runs, "brierlm", {label: {"brierlm": known[f"{key}_brierlm"],
                                                          "brierlm_se": known[f"{key}_brierlm_se"]}
                                                  for label, key in zip(known_runs, ("calm", "ar"))})
    known_ax.axhline(known["optimum_brierlm"], color="k", linestyle="--", label="optimum (exact)")
    known_ax.set(xlabel="training FLOPs", title=f"Known answer ({known['rung']}): held-out BrierLM, +-2 SE",
                 ylim=(0, 1.1 * known["optimum_brierlm"]))
    labels = list(finals)
    final_ax.bar(labels, [finals[k]["brierlm"] for k in labels], yerr=[2 * finals[k]["brierlm_se"] for k in labels],
                 capsize=4, color=["C1", "C2"][:len(labels)])
    final_ax.set(title="Real text: final held-out BrierLM (x100, as in summary.json), +-2 SE")
    for ax in (loss, brier1, known_ax):
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_curves(ax, runs: dict[str, pathlib.Path], key: str, finals: dict[str, dict]) -> None:
    """Each run's in-run held-out `key` (eval.jsonl) against training FLOPs, ending at its final evaluation."""
    for i, (label, run_dir) in enumerate(runs.items()):
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        flops_at = {r["step"]: r["flops"] for r in metrics}
        rows = [r for r in read_jsonl(run_dir / "eval.jsonl") if key in r]
        ax.errorbar([flops_at[r["step"]] for r in rows], [r[key] for r in rows], color=f"C{i + 1}",
                    yerr=[2 * (r.get(f"{key}_se") or 0) for r in rows], marker="o", capsize=2, alpha=0.5,
                    label=f"{label} (in-run, few batches)")
        final = finals[label]
        ax.errorbar([metrics[-1]["flops"]], [final[key]], yerr=[2 * final[f"{key}_se"]], color=f"C{i + 1}",
                    marker="*", markersize=12, capsize=3, linestyle="none", label=f"{label} (final evaluation)")


def train_ar_matched(data: pathlib.Path, calm: pathlib.Path, run_dir: pathlib.Path, evals: int = 4,
                     overrides: tuple[str, ...] = ()) -> pathlib.Path:
    """demo_ar on `data` for as many steps as give CALM's training FLOPs (train/flops.py), `evals` in-run
    evaluations."""
    from calm_train.data.dataset_info import read_dataset_info
    from calm_train.train.flops import train_flops_per_token
    ar_cfg = load_config("demo_ar", [f"data.train={data}"])
    ar_cfg.model.vocab_size = read_dataset_info(data).vocab_size
    ar_flops_per_step = train_flops_per_token(ar_cfg.model, SEQ_LEN) * ar_cfg.train.global_batch * SEQ_LEN
    ar_steps = max(1, round(total_flops(calm) / ar_flops_per_step))
    say(f"AR baseline at matched training FLOPs: {ar_steps} steps")
    return train("demo_ar", run_dir, [f"data.train={data}", f"train.steps={ar_steps}",
                                      f"train.eval_every={max(1, ar_steps // evals)}", *overrides])


def train_known_calm(data: pathlib.Path, ae: pathlib.Path, run_dir: pathlib.Path) -> pathlib.Path:
    """The known-answer stage's CALM: demo_calm against the stage's autoencoder, KNOWN_CALM_STEPS steps."""
    return train("demo_calm", run_dir, [f"data.train={data}", f"model.autoencoder={ae}", *KNOWN_AE, *KNOWN_EVAL,
                                        f"train.steps={KNOWN_CALM_STEPS}", f"train.eval_every={KNOWN_CALM_STEPS // 2}"])


def known_answer(out: pathlib.Path) -> tuple[dict, dict[str, pathlib.Path]]:
    """CALM and AR at matched FLOPs on the known-answer language; their held-out BrierLM next to the optimum."""
    from calm_train.train.inference import evaluate_checkpoint
    data = prepare_known(out)
    ae = train("demo_autoencoder", out / "autoencoder",
               [f"data.train={data}", *KNOWN_AE, f"train.steps={KNOWN_AE_STEPS}"])
    calm = train_known_calm(data, ae, out / "calm")
    ar = train_ar_matched(data, calm, out / "ar", evals=2, overrides=KNOWN_EVAL)
    calm_eval = evaluate_checkpoint(str(calm), samples=EVAL_SAMPLES)
    ar_eval = evaluate_checkpoint(str(ar))
    block = {"rung": KNOWN_RUNG, "optimum_brierlm": calm_eval["optimum_brierlm"],
             "calm_brierlm": calm_eval["brierlm"], "calm_brierlm_se": calm_eval["brierlm_se"],
             "ar_brierlm": ar_eval["brierlm"], "ar_brierlm_se": ar_eval["brierlm_se"],
             "calm_real_chunk_fraction": calm_eval["real_chunk_fraction"],
             "calm_energy_position": calm_eval["energy_position"],
             "calm_fraction_of_optimum": calm_eval["brierlm"] / calm_eval["optimum_brierlm"],
             "ar_fraction_of_optimum": ar_eval["brierlm"] / calm_eval["optimum_brierlm"],
             "calm_train_flops": total_flops(calm), "ar_train_flops": total_flops(ar),
             "calm_learns": calm_learns(calm_eval)}
    say(f"known answer ({KNOWN_RUNG}): optimum BrierLM {block['optimum_brierlm']:.3g}; CALM {block['calm_brierlm']:.3g} "
        f"+- {block['calm_brierlm_se']:.2g} ({100 * block['calm_fraction_of_optimum']:.0f}% of it, "
        f"{100 * block['calm_real_chunk_fraction']:.0f}% real chunks), AR {block['ar_brierlm']:.3g} "
        f"+- {block['ar_brierlm_se']:.2g} ({100 * block['ar_fraction_of_optimum']:.0f}%)")
    return block, {"CALM (K=4)": calm, "AR baseline": ar}


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
    known, known_runs = known_answer(out / "known_answer")
    data = prepare(out)
    common = [f"data.train={data}"]
    ae = train("demo_autoencoder", out / "autoencoder", common)
    calm = train("demo_calm", out / "calm", common + [f"model.autoencoder={ae}"])
    calm_flops = total_flops(calm)
    ar = train_ar_matched(data, calm, out / "ar")
    say("evaluating on held-out text")
    ae_eval = evaluate_checkpoint(str(ae))
    calm_eval = evaluate_checkpoint(str(calm), samples=EVAL_SAMPLES)
    ar_eval = evaluate_checkpoint(str(ar))
    sample = generate_text(str(calm), PROMPT, temperature=0.5, max_new_tokens=48, seed=0)
    curves = plot_curves(out, {"autoencoder": ae, "CALM (K=4)": calm, "AR baseline": ar},
                         {"CALM (K=4)": calm_eval, "AR baseline": ar_eval}, known_runs, known)
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
        "known_answer": known,
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
    if not known["calm_learns"]:
        say(f"CALM did not learn the known answer ({KNOWN_RUNG}), which it learns in every measured run "
            "(tests/test_demo.py): something in training or evaluation is broken")
    if not summary["calm_learns"]:
        say(NOT_LEARNING)
    say(f"sample (T=0.5): {PROMPT!r} -> {sample!r}")
    say(f"wrote {out / 'summary.json'} and {curves} in {summary['wall_s']:.0f}s")
    return 0 if math.isfinite(summary["calm_brierlm"]) else 1

"""Learning ladder: where does CALM fall off on languages whose optimum is known, and what moves it?

Every run goes through the project's own code paths, like benchmarks/learning.py (whose helpers it
uses): `python -m data_prep.corpus OUT --source synthetic:RUNG` (data_prep/synthetic/rungs.py), `calm-train
prepare` with the language's own tokenizer, `run_training` on the demo configs with `key=value` overrides,
and `evaluate_checkpoint` (= `calm-train eval CKPT --samples S --max-tokens N`), which reports the exact
optimum Brier-n / BrierLM of the held-out positions it scores.  For each rung:

1. data: --tokens training tokens of the rung (seed 0) and 20k held-out tokens, 64-token sequences,
   prepared once per K.
2. autoencoder: demo_autoencoder + the recipe's AE overrides (once per rung, K and setting).
3. CALM: demo_calm + the recipe's overrides, K = model.patch_size; AR: demo_ar.  Every model of a budget
   gets the same training FLOPs (train/flops.py, as the demo counts them): budget x the FLOPs of the demo's
   CALM (K = 4, 600 steps), so K = 1 CALM (4x the positions per token) and a deeper head take fewer steps.
4. held-out evaluation of the final checkpoint on the first --eval-tokens of the validation split: CALM
   with the U-statistic over --samples S head samples (rolled out for K < 4), its energy position and
   real-chunk fraction; AR with the Rao-Blackwellised estimator; both as a fraction of the optimum.

Runs are cached under --work (a finished run is not retrained), and every finished run is appended to
WORK/log.jsonl, so the study can be extended, run as several processes on disjoint grids, and its report
rebuilt (--report) from the cache without training.  Torch threads: --threads (default 1).

    python benchmarks/learning_ladder.py --rungs templates markov300 --ks 4 --recipes paper head \\
        --budgets 1 --seeds 0 1 --out benchmarks/results/learning_ladder.json
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402  (sets the CPU/offline environment before DeepSpeed is imported)
import learning  # noqa: E402

SEQ_LEN = learning.SEQ_LEN
DEMO_CALM_STEPS = 600
VAL_TOKENS = 20_000


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Overrides of demo_autoencoder (ae) and demo_calm (calm) on top of the demo's recipe."""
    ae: tuple[str, ...] = ()
    calm: tuple[str, ...] = ()
    note: str = ""


PAPER = ("model.head.init=reference", "model.head.hidden_in_stream=false")   # the paper's head
HEAD = ("model.head.init=fan_in", "model.head.hidden_in_stream=true")          # demo_calm's head since this study
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(calm=PAPER, note="the paper's recipe (demo_calm with the paper's head: init std 0.02)"),
    "head": Recipe(calm=HEAD, note="head: fan-in init and the hidden embedding added to the stream (demo_calm)"),
    "head_fan_in": Recipe(calm=HEAD[:1], note="head: fan-in init only"),
    "head_stream": Recipe(calm=HEAD[1:], note="head: the hidden embedding added to the stream only"),
}


def knob(name: str, base: str, note: str, ae: tuple = (), calm: tuple = ()) -> None:
    """A recipe that is `base` plus more overrides."""
    b = RECIPES[base]
    RECIPES[name] = Recipe(b.ae + ae, b.calm + calm, note)


for _base in ("paper", "head"):
    _p = "" if _base == "paper" else "head+"
    for _lr in ("5e-3", "1e-2"):
        knob(f"{_p}lr{_lr}", _base, f"{_p}lr {_lr}", calm=(f"train.lr={_lr}",))
    knob(f"{_p}warmup100", _base, f"{_p}warm-up 100 steps", calm=("train.warmup_steps=100",))
    knob(f"{_p}beta0.5", _base, f"{_p}energy exponent beta 0.5", calm=("model.head.beta=0.5",))
    knob(f"{_p}beta1.5", _base, f"{_p}energy exponent beta 1.5", calm=("model.head.beta=1.5",))
    knob(f"{_p}n32", _base, f"{_p}N = 32 head samples", calm=("model.head.num_samples=32",))
    knob(f"{_p}m1", _base, f"{_p}M = 1 posterior sample as the target", calm=("model.head.num_target_samples=1",))
    knob(f"{_p}noise128", _base, f"{_p}noise size 128", calm=("model.head.noise_size=128",))
    knob(f"{_p}blocks4", _base, f"{_p}4 head blocks", calm=("model.head.num_blocks=4",))
    for _d in (16, 32):
        knob(f"{_p}latent{_d}", _base, f"{_p}latent size {_d}", ae=(f"model.ae.latent_size={_d}",),
             calm=(f"model.ae.latent_size={_d}",))
    for _w in ("0.01", "0.1"):
        knob(f"{_p}kl{_w}", _base, f"{_p}AE KL weight {_w}", ae=(f"model.ae.kl_weight={_w}",))
    knob(f"{_p}klclamp0.1", _base, f"{_p}AE KL clamp 0.1", ae=("model.ae.kl_clamp=0.1",))
    knob(f"{_p}init0.06", _base, f"{_p}model.init_std 0.06 (backbone, compression, head)", calm=("model.init_std=0.06",))
    knob(f"{_p}wide", _base, f"{_p}backbone width 256",
         calm=("model.backbone.hidden_size=256", "model.backbone.intermediate_size=512", "model.backbone.num_heads=8"))


# ---------------------------------------------------------------------------------------------
# data


def rung_data(work: pathlib.Path, rung: str, k: int, tokens: int) -> pathlib.Path:
    """The rung's corpus (seed 0) prepared with its own tokenizer at patch size k."""
    from data_prep.cli import main as prepare_main
    from data_prep.corpus import write_synthetic
    base = work / "data" / f"{rung}_t{tokens}"
    data = work / "data" / f"{rung}_t{tokens}_k{k}"
    if (data / "dataset.json").is_file():
        return data
    corpus = base.with_suffix(".jsonl")
    if not corpus.with_suffix(".tokenizer.json").is_file():
        write_synthetic(str(corpus), rung, 0, tokens, VAL_TOKENS)
    args = ["--input", str(corpus), "--val-input", str(corpus.with_suffix(".val.jsonl")),
            "--tokenizer", str(corpus.with_suffix(".tokenizer.json")), "--out", str(data),
            "--seq-len", str(SEQ_LEN), "--patch-size", str(k)]
    if prepare_main(args) != 0:
        raise SystemExit(f"learning_ladder.py: prepare failed for {data}")
    return data


def rung_stats(data: pathlib.Path) -> dict:
    """What makes a rung hard: vocabulary, distinct K-token chunks of the training split, entropy per token."""
    from calm_train.data.chunk_pool import ChunkPool
    from calm_train.data.dataset_info import read_dataset_info
    from data_prep.synthetic.optimum import split_optimum
    cache = data / "study_rung.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    info = read_dataset_info(data)
    pool = ChunkPool.from_split(data, "train", info.patch_size, info.vocab_size)
    optimum = split_optimum(data, "val")
    stats = {"vocab_size": info.vocab_size, "lexicon": len(optimum.language.words),
             "description": optimum.language.description, "train_chunks": len(pool), "distinct_chunks": pool.distinct,
             "entropy_bits_per_token": optimum.entropy_bits}
    cache.write_text(json.dumps(stats, indent=1))
    return stats


# ---------------------------------------------------------------------------------------------
# runs


def flops_per_step(config: str, data: pathlib.Path, overrides: list[str]) -> float:
    from calm_train.config import load_config
    from calm_train.data.dataset_info import read_dataset_info
    from calm_train.train.flops import train_flops_per_token
    cfg = load_config(config, [f"data.train={data}", *overrides], validate_now=False)
    cfg.model.vocab_size = read_dataset_info(data).vocab_size
    return train_flops_per_token(cfg.model, SEQ_LEN) * cfg.train.global_batch * SEQ_LEN


def steps_for(budget: float, demo_flops: float, per_step: float) -> int:
    return max(1, round(budget * demo_flops / per_step))


def final_eval(run_dir: pathlib.Path, samples: int | None, eval_tokens: int) -> dict:
    row = learning.evaluate(run_dir, samples, eval_tokens)[-1]
    if row.get("optimum_brierlm"):
        row["fraction_of_optimum"] = row["brierlm"] / row["optimum_brierlm"]
    return row


def run_one(work: pathlib.Path, rung: str, model: str, k: int, recipe_name: str, budget: float, seed: int,
            tokens: int, samples: int, eval_tokens: int) -> dict:
    """One trained and evaluated model (model: calm | ar); cached."""
    data = rung_data(work, rung, k, tokens)
    demo_flops = DEMO_CALM_STEPS * flops_per_step("demo_calm", rung_data(work, rung, 4, tokens), list(PAPER))
    log: list = []
    run_dir = work / "ar" / f"{rung}_t{tokens}" / f"b{budget}_s{seed}" if model == "ar" else \
        work / "calm" / f"{rung}_t{tokens}_k{k}" / f"{recipe_name}_b{budget}_s{seed}"
    fresh = not (run_dir / f"study_eval_s{None if model == 'ar' else samples}_t{eval_tokens}.json").is_file()
    record = {"rung": rung, "model": model, "k": k, "recipe": recipe_name, "budget": budget, "seed": seed,
              "rung_stats": rung_stats(data)}
    if model == "ar":
        steps = steps_for(budget, demo_flops, flops_per_step("demo_ar", data, []))
        run = learning.train("demo_ar", run_dir, [f"data.train={data}", f"train.steps={steps}", "train.eval_every=0",
                                                  "train.save_every=0", f"train.seed={seed}"], log)
        record.update(recipe="ar", steps=steps, run=run, eval=final_eval(run_dir, None, eval_tokens))
    else:
        recipe = RECIPES[recipe_name]
        common_args = [f"data.train={data}", f"model.patch_size={k}"]
        ae_dir = work / "ae" / f"{rung}_t{tokens}_k{k}_{learning.key_of(recipe.ae)}"
        ae = learning.train("demo_autoencoder", ae_dir, common_args + list(recipe.ae), log)
        calm_args = common_args + [f"model.autoencoder={ae_dir}", *recipe.calm]
        steps = steps_for(budget, demo_flops, flops_per_step("demo_calm", data, calm_args))
        run = learning.train("demo_calm", run_dir, calm_args + [f"train.steps={steps}", "train.eval_every=0",
                                                                "train.save_every=0", f"train.seed={seed}"], log)
        ae_eval = learning.evaluate(ae_dir, None, eval_tokens)[-1]
        record.update(steps=steps, overrides=list(recipe.ae) + list(recipe.calm), run=run,
                      autoencoder={**ae, "recon_acc": ae_eval["recon_acc"]}, eval=final_eval(run_dir, samples, eval_tokens))
    if fresh:                                  # evaluated now: keep it in the running log
        with open(work / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")
    return record


# ---------------------------------------------------------------------------------------------
# report


COLUMNS = ("brierlm", "brierlm_se", "brier1", "brier2", "brier3", "brier4", "optimum_brierlm",
           "fraction_of_optimum", "energy_position", "energy_position_se", "real_chunk_fraction",
           "heldout_real_chunk_fraction")


def table_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        row = {key: r[key] for key in ("rung", "model", "k", "recipe", "budget", "seed", "steps")}
        row.update(flops=r["run"]["flops"], wall_s=r["run"]["wall_s"], **{c: r["eval"].get(c) for c in COLUMNS})
        rows.append(row)
    return rows


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean (and spread) over seeds of each (rung, model, k, recipe, budget)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in ("rung", "model", "k", "recipe", "budget")), []).append(row)
    out = []
    for key, group in groups.items():
        def mean(c):
            values = [g[c] for g in group if g[c] is not None]
            return sum(values) / len(values) if values else None
        row = dict(zip(("rung", "model", "k", "recipe", "budget"), key), seeds=len(group))
        row.update({c: mean(c) for c in ("brierlm", "optimum_brierlm", "fraction_of_optimum", "energy_position",
                                          "real_chunk_fraction", "flops")})
        fractions = [g["fraction_of_optimum"] for g in group if g["fraction_of_optimum"] is not None]
        row["fraction_min"], row["fraction_max"] = (min(fractions), max(fractions)) if fractions else (None, None)
        out.append(row)
    return out


def plot(summary: list[dict], rungs: list[str], path: pathlib.Path) -> None:
    """Per rung: fraction of the optimum BrierLM of each model (bars: budgets), CALM's energy position and
    real-chunk fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = sorted({(r["model"], r["k"], r["recipe"]) for r in summary}, key=lambda s: (s[0] != "ar", s))
    budgets = sorted({r["budget"] for r in summary})
    fig, axes = plt.subplots(1, 3, figsize=(21, 5))
    width = 0.8 / max(1, len(series) * len(budgets))
    for i, (model, k, recipe) in enumerate(series):
        for j, budget in enumerate(budgets):
            label = "AR" if model == "ar" else f"CALM K={k} {recipe}"
            cells = {r["rung"]: r for r in summary
                     if (r["model"], r["k"], r["recipe"], r["budget"]) == (model, k, recipe, budget)}
            x = [n + (i * len(budgets) + j) * width for n, rung in enumerate(rungs) if rung in cells]
            got = [cells[rung] for rung in rungs if rung in cells]
            color = f"C{i % 10}"
            alpha = 0.45 + 0.55 * j / max(1, len(budgets) - 1)
            axes[0].bar(x, [g["fraction_of_optimum"] or 0 for g in got], width, color=color, alpha=alpha,
                        label=f"{label} x{budget:g}")
            if model == "calm":
                axes[1].bar(x, [g["energy_position"] or 0 for g in got], width, color=color, alpha=alpha)
                axes[2].bar(x, [g["real_chunk_fraction"] or 0 for g in got], width, color=color, alpha=alpha)
    titles = ("held-out BrierLM / the rung's optimum (mean over seeds)",
              "CALM energy position (0 = random-chunk marginal, 1 = oracle)", "CALM decoded samples that are real chunks")
    for ax, title in zip(axes, titles):
        ax.set_xticks([n + 0.4 - width / 2 for n in range(len(rungs))], rungs, rotation=20)
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    from data_prep.synthetic.rungs import LADDER
    parser = common.base_parser(__doc__, "learning_ladder")
    parser.add_argument("--rungs", nargs="+", default=list(LADDER), choices=list(LADDER))
    parser.add_argument("--ks", nargs="+", type=int, default=[4], help="CALM patch sizes K")
    parser.add_argument("--recipes", nargs="+", default=["paper"], choices=list(RECIPES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0], help="multiples of the demo's CALM FLOPs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-ar", action="store_true", help="CALM runs only (the AR rows come from another call)")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per rung")
    parser.add_argument("--work", default="bench_out/learning/ladder", help="run directories (cached between calls)")
    parser.add_argument("--samples", type=int, default=16, help="CALM head samples per position (U-statistic)")
    parser.add_argument("--eval-tokens", type=int, default=200 * SEQ_LEN, help="held-out tokens per evaluation")
    parser.add_argument("--report", action="store_true", help="only the runs already cached; train nothing")
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    common.apply_threads(args.threads)
    work = pathlib.Path(args.work)
    grid = [(rung, "calm", k, recipe, budget, seed) for rung in args.rungs for budget in args.budgets
            for seed in args.seeds for k in args.ks for recipe in args.recipes]
    if not args.no_ar:
        grid += [(rung, "ar", 4, "ar", budget, seed) for rung in args.rungs for budget in args.budgets for seed in args.seeds]
    records = []
    for rung, model, k, recipe, budget, seed in grid:
        if args.report:
            found = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()] \
                if (work / "log.jsonl").is_file() else []
            found = [r for r in found if (r["rung"], r["model"], r["k"], r["recipe"], r["budget"], r["seed"])
                     == (rung, model, k, recipe, budget, seed)]
            records += found[-1:]
        else:
            records.append(run_one(work, rung, model, k, recipe, budget, seed, args.tokens, args.samples,
                                   args.eval_tokens))
        rows = table_rows(records)
        common.write_json(args.out, {"argv": sys.argv, "machine": common.machine(), "samples": args.samples,
                                     "eval_tokens": args.eval_tokens, "tokens": args.tokens,
                                     "recipes": {n: dataclasses.asdict(RECIPES[n]) for n in args.recipes},
                                     "rungs": {r["rung"]: r["rung_stats"] for r in records},
                                     "runs": records, "table": rows, "summary": summary_rows(rows)})
    summary = summary_rows(table_rows(records))
    plot(summary, [r for r in args.rungs if any(s["rung"] == r for s in summary)], pathlib.Path(args.out).with_suffix(".png"))
    common.print_table(summary, [
        ("rung", "rung", "s"), ("model", "model", "s"), ("k", "K", "d"), ("recipe", "recipe", "s"),
        ("budget", "budget", "g"), ("seeds", "seeds", "d"), ("brierlm", "BrierLM", ".3f"),
        ("optimum_brierlm", "optimum", ".2f"), ("fraction_of_optimum", "fraction", ".3f"),
        ("fraction_min", "min", ".3f"), ("fraction_max", "max", ".3f"),
        ("energy_position", "energy pos", ".3f"), ("real_chunk_fraction", "real", ".3f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

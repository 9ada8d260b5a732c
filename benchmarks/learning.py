"""Learning study: where does a small CALM start to learn?  AE + CALM + FLOP-matched AR over a grid.

Every run goes through the project's own code paths (data_prep prepare, `run_training` on the demo
configs with `key=value` overrides, `evaluate_checkpoint`), so each row of the result is what
`calm-train train demo_calm ...` and `calm-train eval ... --samples S` give; the JSON records those
commands.  For each point of the grid:

1. data: the embedded corpus (data_prep.corpus), the Debian documentation corpus
   (data_prep.package_docs, when its packages are installed), or both; byte-level BPE of the
   point's vocabulary, 64-token sequences, K = 4, 5% validation.  Prepared once per (corpus, vocab).
2. autoencoder: demo_autoencoder + the point's AE overrides (trained once per distinct setting).
3. CALM: demo_calm + overrides, checkpoints kept at every quarter of its steps.
4. AR: demo_ar, steps chosen so its training FLOPs equal CALM's (models' FLOPs as the demo counts
   them: train/flops.py; the autoencoder's own training is reported separately), checkpoints at the
   same quarters.
5. held-out evaluation of every kept checkpoint on the first --eval-tokens of the validation split:
   CALM with the U-statistic over --samples S, the energy loss with its marginal and oracle
   references and the real-chunk fraction (train/calm_diagnostics.py); AR with the Rao-Blackwellised
   estimator.  Standard errors over positions.

Runs are cached under --work (a finished run is not retrained), so the study can be extended point
by point.  One training process at a time, torch threads set by --threads; each run records its wall
and CPU seconds and the machine's load average before and after.

    python benchmarks/learning.py --points base kl_0.1 --out benchmarks/results/learning_grid.json
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402  (sets the CPU/offline environment before DeepSpeed is imported)

SEQ_LEN = 64
QUARTERS = 4
WIKITEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext" / "wikitext_document_level-test.json"


# this study's points use the paper's energy head, as demo_calm did when it was measured (demo_calm now has the
# head of the learning ladder, benchmarks/learning_ladder.py)
PAPER_HEAD = ("model.head.init=reference", "model.head.hidden_in_stream=false")


@dataclasses.dataclass(frozen=True)
class Point:
    """One setting of the grid: overrides on top of the demo configs."""
    corpus: str = "embedded"                 # embedded | package_docs | both
    vocab: int = 2048
    ae: tuple[str, ...] = ()                 # overrides of demo_autoencoder (model.ae.*, train.*)
    calm: tuple[str, ...] = ()               # overrides of demo_calm (model.backbone.*, model.head.*, train.*)
    ar: tuple[str, ...] = ()                 # overrides of demo_ar besides train.steps
    calm_steps: int = 600
    note: str = ""


DEMO = Point(note="today's demo recipe")
POINTS: dict[str, Point] = {
    "demo": DEMO,
    "demo_x4": dataclasses.replace(DEMO, calm_steps=2400, note="4x the demo's CALM steps"),
    "kl_0.1": dataclasses.replace(DEMO, ae=("model.ae.kl_weight=0.1",), note="AE KL weight 0.1 (lower-information latent)"),
    "v512": dataclasses.replace(DEMO, vocab=512, note="vocabulary 512 (shorter tokens: 4-token chunks repeat more)"),
    "v512_kl1": dataclasses.replace(DEMO, vocab=512, ae=("model.ae.kl_weight=1.0",),
                                    note="vocabulary 512, AE KL weight 1 (KL near its clamp: a smooth, low-information latent)"),
    "docs_kl0.1_x6": dataclasses.replace(DEMO, corpus="package_docs", ae=("model.ae.kl_weight=0.1",), calm_steps=3600,
                                         note="6x the demo's CALM steps on the 20 MB documentation corpus, AE KL 0.1"),
}
DOCS_X6 = POINTS["docs_kl0.1_x6"]
POINTS.update({
    "docs_x6": dataclasses.replace(DOCS_X6, ae=(), note="as docs_kl0.1_x6 with the demo's autoencoder (KL weight 1e-3)"),
    "docs_kl0.1_x6_wide": dataclasses.replace(
        DOCS_X6, calm=("model.backbone.hidden_size=256", "model.backbone.intermediate_size=512", "model.backbone.num_heads=8"),
        note="as docs_kl0.1_x6 with a backbone of width 256 (head width follows)"),
    "docs_kl0.1_x6_head": dataclasses.replace(
        DOCS_X6, calm=("model.head.num_blocks=4", "model.head.noise_size=64"),
        note="as docs_kl0.1_x6 with the paper's energy head depth and noise size (4 blocks, noise 64)"),
    "docs_kl0.1_x24": dataclasses.replace(DOCS_X6, calm_steps=14400,
                                          note="24x the demo's CALM steps (14.7M tokens) on the documentation corpus"),
})


# ---------------------------------------------------------------------------------------------
# data


def corpus_docs(name: str) -> list[str]:
    from data_prep.corpus import default_corpus
    from data_prep.package_docs import package_docs
    docs = []
    if name in ("embedded", "both"):
        docs += default_corpus()
    if name in ("package_docs", "both"):
        from data_prep.package_docs import read_jsonl_texts
        held_out = read_jsonl_texts(WIKITEXT) if WIKITEXT.is_file() else []
        from_packages, _ = package_docs("/", held_out + default_corpus())
        if not from_packages:
            raise SystemExit("learning.py: the package_docs corpus needs its Debian packages: apt-get install "
                             "--no-install-recommends linux-doc-6.1 perl-doc python3.11-doc")
        docs += from_packages
    if not docs:
        raise SystemExit(f"learning.py: unknown corpus {name!r}: use embedded, package_docs or both")
    return docs


def prepared(work: pathlib.Path, corpus: str, vocab: int) -> pathlib.Path:
    from data_prep.cli import main as prepare_main
    from data_prep.corpus import write_corpus_jsonl
    data = work / "data" / f"{corpus}_v{vocab}"
    if (data / "dataset.json").is_file():
        return data
    jsonl = write_corpus_jsonl(work / "data" / f"{corpus}.jsonl", corpus_docs(corpus)) \
        if not (work / "data" / f"{corpus}.jsonl").is_file() else work / "data" / f"{corpus}.jsonl"
    args = ["--input", str(jsonl), "--tokenizer", f"train:{vocab}", "--out", str(data), "--seq-len", str(SEQ_LEN),
            "--patch-size", "4", "--val-fraction", "0.05"]
    if prepare_main(args) != 0:
        raise SystemExit(f"learning.py: prepare failed for {data}")
    return data


# ---------------------------------------------------------------------------------------------
# training


def train(config: str, run_dir: pathlib.Path, overrides: list[str], log: list, time_capped: bool = False) -> dict:
    """run_training(load_config(config, overrides)) unless run_dir holds a finished run; returns its record.
    time_capped: a run that train.max_wallclock stopped (exit 75, checkpoint saved) counts as finished, and its
    record says `stopped_by_wallclock`."""
    from calm_train.config import load_config
    from calm_train.train.loop import EXIT_REQUEUE, run_training
    record_path = run_dir / "study_run.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    args = [f"run_dir={run_dir}", "logging.progress=false", *overrides]
    command = "calm-train train " + " ".join([config, *args])
    print(f"[learning] {command}", file=sys.stderr, flush=True)
    load_before, wall, cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    code = run_training(load_config(config, args))
    if code != 0 and not (time_capped and code == EXIT_REQUEUE):
        raise SystemExit(f"learning.py: {command} exited {code}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record = {"command": command, "wall_s": round(time.perf_counter() - wall, 1),
              "cpu_s": round(time.process_time() - cpu, 1), "load_before": load_before, "load_after": os.getloadavg(),
              "flops": rows[-1]["flops"], "tokens": rows[-1]["tokens"], "final_loss": rows[-1]["loss"],
              "steps": rows[-1]["step"], "stopped_by_wallclock": code != 0}
    record_path.write_text(json.dumps(record, indent=1))
    log.append(record)
    return record


def ar_flops_per_step(data: pathlib.Path, overrides: list[str]) -> float:
    from calm_train.config import load_config
    from calm_train.data.dataset_info import read_dataset_info
    from calm_train.train.flops import train_flops_per_token
    cfg = load_config("demo_ar", overrides)
    cfg.model.vocab_size = read_dataset_info(data).vocab_size
    return train_flops_per_token(cfg.model, SEQ_LEN) * cfg.train.global_batch * SEQ_LEN


def quarter_overrides(steps: int) -> list[str]:
    every = max(1, steps // QUARTERS)
    return [f"train.steps={steps}", f"train.save_every={every}", f"train.keep_every={every}", "train.eval_every=0"]


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(run_dir: pathlib.Path, samples: int | None, eval_tokens: int, data: pathlib.Path | None = None,
             train_data: pathlib.Path | None = None, last_only: bool = False) -> list[dict]:
    """evaluate_checkpoint of every kept checkpoint of run_dir (the last only with last_only), on data (default: the
    run's validation split), CALM's chunk reference from train_data (default: the run's data.train); cached in
    run_dir/study_eval_*.json."""
    from calm_train.train.inference import evaluate_checkpoint
    on = "" if data is None else f"_{data.name}"
    cache = run_dir / f"study_eval_s{samples}_t{eval_tokens}{on}{'_last' if last_only else ''}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = []
    flops_at = {r["step"]: r["flops"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    for ckpt in checkpoints[-1:] if last_only else checkpoints:
        step = int(ckpt.name.split("_")[1])
        wall = time.perf_counter()
        row = evaluate_checkpoint(str(ckpt), data=None if data is None else str(data), max_tokens=eval_tokens,
                                  samples=samples, train_data=None if train_data is None else str(train_data))
        row.update(step=step, flops=flops_at[step], eval_wall_s=round(time.perf_counter() - wall, 1))
        rows.append(row)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def latent_stats(ae_dir: pathlib.Path, data: pathlib.Path, chunks: int = 4096) -> dict:
    """The frozen autoencoder's latent on held-out chunks: information (KL to N(0, I), nats per chunk), posterior
    std against the spread of the posterior means, and its geometry: the mean distance between the means of two
    chunks that share their first token, and of two that share none of their K tokens, over random pairs."""
    import numpy as np
    import torch
    from calm_train.data.shards import read_split
    from calm_train.train.frozen_autoencoder import find_autoencoder, load_frozen_autoencoder
    cache = ae_dir / "study_latent.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    ae = load_frozen_autoencoder(find_autoencoder(str(ae_dir)), torch.device("cpu"))
    tokens = torch.from_numpy(read_split(data, "val").astype(np.int64)).view(-1, 4)[:chunks]
    with torch.no_grad():
        mean, log_std = ae.encode(tokens[None])
    mean, std = mean[0], log_std[0].exp()
    kl = (0.5 * (mean ** 2 + std ** 2 - 1) - std.log()).sum(-1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(len(tokens), (2, 200_000), generator=g)
    dist = (mean[a] - mean[b]).norm(dim=-1)
    share_first = (tokens[a, 0] == tokens[b, 0]) & (tokens[a] != tokens[b]).any(-1)
    share_none = (tokens[a] != tokens[b]).all(-1)
    stats = {"kl_nats_per_chunk": float(kl.mean()), "posterior_std": float(std.mean()),
             "mean_spread": float(mean.std(0).mean()), "distance_same_first_token": float(dist[share_first].mean()),
             "distance_no_shared_token": float(dist[share_none].mean()), "latent_size": mean.shape[-1]}
    stats["distance_ratio"] = stats["distance_same_first_token"] / stats["distance_no_shared_token"]
    cache.write_text(json.dumps(stats, indent=1))
    return stats


def run_point(name: str, point: Point, work: pathlib.Path, samples: int, eval_tokens: int) -> dict:
    log: list = []
    data = prepared(work, point.corpus, point.vocab)
    common_args = [f"data.train={data}"]
    ae_dir = work / "ae" / f"{point.corpus}_v{point.vocab}_{key_of(point.ae)}"
    ae = train("demo_autoencoder", ae_dir, common_args + list(point.ae), log)
    calm_dir = work / "calm" / name
    calm = train("demo_calm", calm_dir, common_args + [f"model.autoencoder={ae_dir}", *PAPER_HEAD, *point.calm,
                                                       *quarter_overrides(point.calm_steps)], log)
    ar_steps = max(QUARTERS, round(calm["flops"] / ar_flops_per_step(data, common_args + list(point.ar))))
    ar_steps -= ar_steps % QUARTERS                       # quarters at the same steps
    ar_dir = work / "ar" / f"{point.corpus}_v{point.vocab}_{key_of(point.ar, ar_steps)}"
    ar = train("demo_ar", ar_dir, common_args + list(point.ar) + quarter_overrides(ar_steps), log)
    ae_eval = evaluate(ae_dir, None, eval_tokens)[-1]
    return {"name": name, "point": dataclasses.asdict(point), "data": str(data),
            "autoencoder": {**ae, "recon_acc": ae_eval["recon_acc"], "latent": latent_stats(ae_dir, data)},
            "calm_run": calm, "ar_run": ar,
            "calm": evaluate(calm_dir, samples, eval_tokens), "ar": evaluate(ar_dir, None, eval_tokens)}


# ---------------------------------------------------------------------------------------------
# report


CALM_COLUMNS = ("brier1", "brier1_se", "brier4", "brierlm", "brierlm_se", "energy", "energy_marginal",
                "energy_oracle", "energy_position", "real_chunk_fraction", "heldout_real_chunk_fraction")


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        calm, ar = r["calm"][-1], r["ar"][-1]
        rows.append({"point": r["name"], "flops": calm["flops"], "ae_recon": r["autoencoder"]["recon_acc"],
                     **{f"calm_{k}": calm.get(k) for k in CALM_COLUMNS},
                     "ar_brier1": ar["brier1"], "ar_brierlm": ar["brierlm"], "ar_brierlm_se": ar["brierlm_se"],
                     "ratio": calm["brierlm"] / ar["brierlm"] if ar["brierlm"] > 0 else None})
    return rows


def plot(results: list[dict], path: pathlib.Path) -> None:
    """BrierLM of CALM and AR, their ratio, Brier-1, CALM's energy position and real-chunk fraction vs FLOPs.
    Error bars are 2 standard errors; hollow markers: a Brier-n within 2 SE of 0 (BrierLM's error unreliable)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.6))
    drawn_ar = set()
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        curves = [(r["calm"], "-", "o", f"CALM {r['name']}")]
        if r["ar_run"]["command"] not in drawn_ar:                 # points sharing an AR run draw it once
            drawn_ar.add(r["ar_run"]["command"])
            curves.append((r["ar"], ":", "s", f"AR ({r['name']})"))
        for rows, line, marker, label in curves:
            x = [row["flops"] for row in rows]
            for key, ax, floor in (("brierlm", axes[0], 1e-4), ("brier1", axes[2], None)):
                y = [max(row[key], floor) if floor else row[key] for row in rows]
                ax.errorbar(x, y, yerr=[2 * row[f"{key}_se"] for row in rows], linestyle=line, color=color,
                            label=label, capsize=2)
                for xi, yi, row in zip(x, y, rows):
                    ax.plot(xi, yi, marker, color=color, markersize=5,
                            markerfacecolor="none" if row["brier_near_zero"] else color)
        ratio = [c["brierlm"] / a["brierlm"] if a["brierlm"] > 0 else float("nan") for c, a in zip(r["calm"], r["ar"])]
        axes[1].plot([c["flops"] for c in r["calm"]], [max(v, 1e-5) for v in ratio], "-o", color=color, label=r["name"])
        axes[3].errorbar([c["flops"] for c in r["calm"]], [c["energy_position"] for c in r["calm"]],
                         yerr=[2 * c["energy_position_se"] for c in r["calm"]], fmt="-o", color=color, label=r["name"],
                         capsize=2, markersize=4)
        axes[4].plot([c["flops"] for c in r["calm"]], [c["real_chunk_fraction"] for c in r["calm"]], "-o", color=color,
                     label=r["name"], markersize=4)
    axes[1].axhline(0.25, color="gray", linestyle="--", label="25% of AR")
    titles = ("held-out BrierLM (x100, log; floor 1e-4)", "CALM BrierLM / AR BrierLM at equal FLOPs (log)",
              "held-out Brier-1", "energy: 0 = random-chunk marginal, 1 = true-chunk oracle",
              "decoded CALM samples that are real chunks")
    for ax, title in zip(axes, titles):
        ax.set(xscale="log", xlabel="training FLOPs", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = common.base_parser(__doc__, "learning")
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--work", default="bench_out/learning/study", help="run directories (cached between calls)")
    parser.add_argument("--samples", type=int, default=16, help="CALM head samples per position (U-statistic)")
    parser.add_argument("--eval-tokens", type=int, default=200 * SEQ_LEN, help="held-out tokens per evaluation")
    parser.set_defaults(threads=2)
    args = parser.parse_args()
    common.apply_threads(args.threads)
    work = pathlib.Path(args.work)
    results = []
    for name in args.points:
        results.append(run_point(name, POINTS[name], work, args.samples, args.eval_tokens))
        payload = {"argv": sys.argv, "machine": common.machine(), "samples": args.samples,
                   "eval_tokens": args.eval_tokens, "results": results, "table": table_rows(results)}
        common.write_json(args.out, payload)
    plot(results, pathlib.Path(args.out).with_suffix(".png"))
    common.print_table(table_rows(results), [
        ("point", "point", "s"), ("flops", "FLOPs", ".3g"), ("ae_recon", "AE recon", ".4f"),
        ("calm_energy", "energy", ".2f"), ("calm_energy_marginal", "marginal", ".2f"),
        ("calm_energy_oracle", "oracle", ".2f"), ("calm_energy_position", "position", ".3f"),
        ("calm_real_chunk_fraction", "real", ".3f"), ("calm_brier1", "CALM B1", ".4f"),
        ("calm_brierlm", "CALM BrierLM", ".3f"), ("calm_brierlm_se", "SE", ".3f"),
        ("ar_brierlm", "AR BrierLM", ".3f"), ("ratio", "CALM/AR", ".3f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Part 3 of the GPU run: CALM against a FLOP-matched AR at GPU scale, on the carried Debian documentation corpus.

    python benchmarks/learning_gpu.py --data .gpu/data --out learning_gpu_h200.json --budget-s 270
                                      [--known-answer DIR] [--smoke] [--work DIR]

The learning study's pipeline (benchmarks/learning.py: `run_training` on demo_autoencoder / demo_calm / demo_ar
with `key=value` overrides, `evaluate_checkpoint`), at GPU size: backbones of 8 layers x 512 (25.7M parameters
without embeddings, CALM and AR alike), the paper's energy head (4 blocks, noise 64) and autoencoder shape
(hidden 512, latent 128, KL weight 0.1 as the study's best point), 128 sequences of 256 tokens per step, bf16.

The minutes decide the steps, measured rather than guessed:
1. calibration: 30 steps of each model (train.log_every=1), their steady step time (median of steps 6..30) and
   fixed cost (engine build, loader start, checkpoint, final evaluation: wall time - the steps' time);
2. plan: after the calibration, the time left (--budget-s from the start, less the evaluations' reserve and
   each run's fixed cost) goes AE_SHARE to the autoencoder, the rest to CALM and AR at equal training FLOPs F:
   F / (CALM FLOP/s) + F / (AR FLOP/s) = their time (models' FLOPs as train/flops.py counts them);
3. the autoencoder, CALM (checkpoints at each quarter of its steps), AR with CALM's FLOPs (quarters at the same
   steps); each run also has train.max_wallclock = 1.25 x its planned time + 15 s: a run stopped there keeps
   its checkpoints, and the result says `stopped_by_wallclock`;
4. held-out evaluation of every quarter on the wikitext file (tokenized with the corpus' tokenizer): CALM with
   the U-statistic over --samples head samples per position, its energy position and real-chunk fraction
   against the training split; AR Rao-Blackwellised; standard errors over positions.  The last checkpoints
   also on the corpus' own validation split (the CPU study's held-out text).

--known-answer DIR (a prepared directory: a known-answer rung's data, train and val splits) runs the same
pipeline on it after the docs study, with --known-answer-share of the budget, evaluated on DIR's val split
(the evaluation reports the rung's optimum when the data carries one: `optimum_*` fields).

The JSON is rewritten after every stage (a cut-off run keeps what it measured) and names the machine
(`kind`, `machine`); the PNG is the study's plot (BrierLM, ratio, Brier-1, energy position, real chunks vs FLOPs).
--smoke: tiny sizes on CPU (the test's dry run of every code path).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402  (the environment before DeepSpeed is imported)
import learning  # noqa: E402

AE_SHARE = 0.15
CALIBRATION_STEPS = 30
GPU_BACKBONE = ("model.backbone.hidden_size=512", "model.backbone.intermediate_size=1408",
                "model.backbone.num_layers=8", "model.backbone.num_heads=8")
SIZES = {
    "gpu": dict(ae=("model.ae.hidden_size=512", "model.ae.intermediate_size=1280", "model.ae.latent_size=128",
                    "model.ae.kl_weight=0.1", "train.micro_batch=128", "train.global_batch=128", "train.lr=1e-3",
                    "train.min_lr=1e-5"),
                calm=(*GPU_BACKBONE, "model.head.num_blocks=4", "model.head.noise_size=64", "train.micro_batch=128",
                      "train.global_batch=128", "train.lr=1e-3", "train.min_lr=1e-4"),
                ar=(*GPU_BACKBONE, "train.micro_batch=128", "train.global_batch=128", "train.lr=1e-3",
                    "train.min_lr=1e-4"),
                calibration_steps=CALIBRATION_STEPS, samples=16, eval_tokens=131072, eval_reserve_s=45,
                min_steps=40),
    "smoke": dict(ae=("model.ae.hidden_size=32", "model.ae.intermediate_size=64", "model.ae.latent_size=8",
                      "train.micro_batch=8", "train.global_batch=8"),
                  calm=("model.backbone.hidden_size=32", "model.backbone.intermediate_size=64",
                        "model.backbone.num_layers=1", "model.backbone.num_heads=2", "model.head.num_blocks=1",
                        "model.head.noise_size=8", "model.head.num_target_samples=10", "train.micro_batch=8",
                        "train.global_batch=8"),
                  ar=("model.backbone.hidden_size=32", "model.backbone.intermediate_size=64",
                      "model.backbone.num_layers=1", "model.backbone.num_heads=2", "train.micro_batch=8",
                      "train.global_batch=8"),
                  calibration_steps=6, samples=2, eval_tokens=512, eval_reserve_s=15, min_steps=4),
}
CONFIGS = {"ae": "demo_autoencoder", "calm": "demo_calm", "ar": "demo_ar"}
RUN_SETTINGS = ["logging.progress=false", "train.eval_every=0"]


def quarters(steps: float) -> int:
    """steps rounded to the nearest multiple of learning.QUARTERS (at least one step per quarter): AR's steps at
    CALM's FLOPs are off by at most QUARTERS / 2 steps."""
    return max(learning.QUARTERS, learning.QUARTERS * round(steps / learning.QUARTERS))


def metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def calibrate(model: str, run_dir: pathlib.Path, overrides: list[str], steps: int) -> dict:
    """`steps` steps of one model: steady seconds per step, fixed seconds per run, training FLOPs per step."""
    from calm_train.config import load_config
    from calm_train.train.loop import run_training
    args = [f"run_dir={run_dir}", *RUN_SETTINGS, *overrides, f"train.steps={steps}", "train.log_every=1",
            "train.warmup_steps=0", "train.eval_batches=1", "train.resume_from=scratch"]
    wall = time.perf_counter()
    if run_training(load_config(CONFIGS[model], args)) != 0:
        raise SystemExit(f"learning_gpu: the calibration run of {model} failed ({run_dir})")
    wall = time.perf_counter() - wall
    rows = metrics(run_dir)
    steady = [r["step_s"] for r in rows[5:]] or [r["step_s"] for r in rows]
    step_s = statistics.median(steady)
    return {"steps": steps, "step_s": step_s, "fixed_s": max(0.0, wall - sum(r["step_s"] for r in rows)),
            "wall_s": wall, "flops_per_step": rows[-1]["flops"] / rows[-1]["step"],
            "tokens_per_s": rows[-1]["tokens"] / rows[-1]["step"] / step_s, "mfu": rows[-1].get("mfu"),
            "peak_mem_gib": rows[-1].get("peak_mem_gib")}


def plan_steps(calibration: dict, seconds: float, min_steps: int) -> dict:
    """AE steps for AE_SHARE of `seconds`, CALM steps so that CALM and AR at CALM's FLOPs share the rest."""
    ae, calm, ar = calibration["ae"], calibration["calm"], calibration["ar"]
    train_s = seconds - ae["fixed_s"] - calm["fixed_s"] - ar["fixed_s"]
    ae_s, lm_s = AE_SHARE * train_s, (1 - AE_SHARE) * train_s
    calm_rate, ar_rate = calm["flops_per_step"] / calm["step_s"], ar["flops_per_step"] / ar["step_s"]
    ae_steps = max(min_steps, int(ae_s / ae["step_s"]))
    calm_steps = quarters(max(min_steps, int(lm_s / (1 / calm_rate + 1 / ar_rate) / calm["flops_per_step"])))
    flops = calm_steps * calm["flops_per_step"]       # at least min_steps each when the time is short
    return {"seconds": seconds, "train_s": train_s, "ae_steps": ae_steps, "calm_steps": calm_steps, "flops": flops,
            "ae_s": ae_steps * ae["step_s"], "calm_s": flops / calm_rate, "ar_s": flops / ar_rate,
            "short_of_time": train_s < (ae_steps * ae["step_s"] + flops / calm_rate + flops / ar_rate)}


def schedule(steps: int, planned_s: float) -> list[str]:
    return [*learning.quarter_overrides(steps), f"train.warmup_steps={max(1, steps // 20)}", "train.schedule=cosine",
            f"train.max_wallclock={1.25 * planned_s + 15:.0f}"]


class Study:
    """One AE + CALM + AR comparison on `data` (held-out text `held_out`, or the data's own val split)."""

    def __init__(self, name: str, data: pathlib.Path, held_out: pathlib.Path | None, work: pathlib.Path, size: dict,
                 record):
        self.name, self.data, self.held_out, self.size, self.record = name, data, held_out, size, record
        self.work = work / name
        self.result: dict = {"name": name, "data": str(data), "held_out": str(held_out or f"{data} (val split)"),
                             "point": {"sizes": {k: list(size[k]) for k in ("ae", "calm", "ar")}}}

    def overrides(self, model: str) -> list[str]:
        """The model's overrides; CALM also takes the autoencoder's shape (model.ae.*), which it must match."""
        shape = [o for o in self.size["ae"] if o.startswith("model.ae.")] if model == "calm" else []
        return [f"data.train={self.data}", *shape, *self.size[model]]

    def run(self, seconds: float) -> dict:
        """Every run afresh (a re-run of the part on the same machine must not resume or reuse the last one's
        calibration, runs or cached evaluations)."""
        started, size, log = time.perf_counter(), self.size, []
        shutil.rmtree(self.work, ignore_errors=True)
        steps = size["calibration_steps"]
        calibration = {"ae": calibrate("ae", self.work / "calibrate_ae", self.overrides("ae"), steps)}
        calm_args = self.overrides("calm")
        calibration["calm"] = calibrate("calm", self.work / "calibrate_calm",
                                        [*calm_args, f"model.autoencoder={self.work / 'calibrate_ae'}"], steps)
        calibration["ar"] = calibrate("ar", self.work / "calibrate_ar", self.overrides("ar"), steps)
        self.result["calibration"] = calibration
        left = seconds - (time.perf_counter() - started) - size["eval_reserve_s"]
        plan = plan_steps(calibration, left, size["min_steps"])
        self.result["plan"] = plan
        self.record(f"[{self.name}] calibration {json.dumps(calibration)}\n[{self.name}] plan {json.dumps(plan)}")
        ae_dir = self.work / "ae"
        ae = learning.train("demo_autoencoder", ae_dir, [*self.overrides("ae"), *schedule(plan["ae_steps"], plan["ae_s"]),
                                                          "train.keep_every=0"], log, time_capped=True)
        self.result["autoencoder"] = ae
        self.record(f"[{self.name}] autoencoder {json.dumps(ae)}")
        calm_dir = self.work / "calm"
        self.result["calm_run"] = learning.train(
            "demo_calm", calm_dir, [*calm_args, f"model.autoencoder={ae_dir}",
                                    *schedule(plan["calm_steps"], plan["calm_s"])], log, time_capped=True)
        self.record(f"[{self.name}] calm {json.dumps(self.result['calm_run'])}")
        ar_steps = quarters(self.result["calm_run"]["flops"] / calibration["ar"]["flops_per_step"])
        ar_dir = self.work / "ar"
        self.result["ar_run"] = learning.train("demo_ar", ar_dir, [*self.overrides("ar"), *schedule(ar_steps, plan["ar_s"])],
                                               log, time_capped=True)
        self.result["flops_ratio_ar_to_calm"] = self.result["ar_run"]["flops"] / self.result["calm_run"]["flops"]
        self.record(f"[{self.name}] ar {json.dumps(self.result['ar_run'])}")
        self.evaluate(ae_dir, calm_dir, ar_dir)
        self.result["wall_s"] = time.perf_counter() - started
        return self.result

    def evaluate(self, ae_dir: pathlib.Path, calm_dir: pathlib.Path, ar_dir: pathlib.Path) -> None:
        size, held_out = self.size, self.held_out
        ae_eval = learning.evaluate(ae_dir, None, size["eval_tokens"], last_only=True)[-1]
        self.result["autoencoder"].update(recon_acc=ae_eval["recon_acc"], latent=learning.latent_stats(ae_dir, self.data))
        self.record(f"[{self.name}] autoencoder recon {ae_eval['recon_acc']:.4f}")
        train_ref = self.data if held_out is not None else None
        for key, run_dir, samples in (("calm", calm_dir, size["samples"]), ("ar", ar_dir, None)):
            self.result[key] = learning.evaluate(run_dir, samples, size["eval_tokens"], held_out, train_ref)
            self.record(f"[{self.name}] {key} held-out quarters " + json.dumps(
                [{k: r.get(k) for k in ("step", "flops", "brierlm", "brierlm_se", "energy_position",
                                        "real_chunk_fraction", "optimum_brierlm")} for r in self.result[key]]))
        if held_out is not None:
            self.result["in_domain"] = {key: learning.evaluate(run_dir, samples, size["eval_tokens"], last_only=True)[-1]
                                        for key, run_dir, samples in (("calm", calm_dir, size["samples"]),
                                                                      ("ar", ar_dir, None))}
        self.result["curves"] = {key: [{k: r.get(k) for k in ("step", "loss", "tokens", "flops", "elapsed_s")}
                                       for r in metrics(d)[::max(1, len(metrics(d)) // 50)]]
                                 for key, d in (("ae", ae_dir), ("calm", calm_dir), ("ar", ar_dir))}


TABLE = [("point", "study", "s"), ("flops", "FLOPs", ".3g"), ("ae_recon", "AE recon", ".4f"),
         ("calm_energy_position", "energy pos", ".3f"), ("calm_real_chunk_fraction", "real", ".3f"),
         ("calm_brier1", "CALM B1", ".4f"), ("calm_brierlm", "CALM BrierLM", ".3f"), ("calm_brierlm_se", "SE", ".3f"),
         ("ar_brierlm", "AR BrierLM", ".3f"), ("ar_brierlm_se", "SE", ".3f"), ("ratio", "CALM/AR", ".4f")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path(".gpu/data"),
                        help="benchmarks/gpu_data.py's output (docs/ and wikitext/)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON result (the PNG beside it)")
    parser.add_argument("--budget-s", type=float, default=270, help="seconds for everything after the imports")
    parser.add_argument("--known-answer", type=pathlib.Path, default=None, help="a prepared rung directory")
    parser.add_argument("--known-answer-share", type=float, default=0.4, help="of --budget-s, with --known-answer")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/learning_gpu"), help="run directories")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU dry run)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    docs, wikitext = args.data / "docs", args.data / "wikitext"
    for path in [docs, wikitext] + ([args.known_answer] if args.known_answer else []):
        if not (path / "dataset.json").is_file():
            raise SystemExit(f"learning_gpu: {path} has no dataset.json. Fix: prepare it with benchmarks/gpu_data.py "
                             "(and carry it)")
    size = SIZES["smoke" if args.smoke else "gpu"]
    machine = common.machine()
    payload = {"argv": sys.argv, "kind": common.device_kind(), "machine": machine, "budget_s": args.budget_s,
               "samples": size["samples"], "eval_tokens": size["eval_tokens"], "results": [], "log": []}

    def record(line: str) -> None:
        print(line, flush=True)
        payload["log"].append(line)
        payload["table"] = learning.table_rows([r for r in payload["results"] if "calm" in r and "ar" in r])
        payload["wall_s"] = time.perf_counter() - started
        common.write_json(args.out, payload)

    share = args.known_answer_share if args.known_answer else 0.0
    studies = [(Study("docs_wikitext", docs, wikitext, args.work, size, record), 1 - share)]
    if args.known_answer:
        studies.append((Study("known_answer", args.known_answer, None, args.work, size, record), 1.0))
    for study, until in studies:              # until: the share of the budget spent when this study ends
        payload["results"].append(study.result)
        study.run(started + until * args.budget_s - time.perf_counter())
        record(f"[{study.name}] done in {study.result['wall_s']:.0f} s")
    done = [r for r in payload["results"] if "calm" in r and "ar" in r]
    learning.plot(done, args.out.with_suffix(".png"))
    common.print_table(payload["table"], TABLE, title=f"CALM vs AR at equal training FLOPs ({payload['kind']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

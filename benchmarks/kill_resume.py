"""kill -9 at random steps, relaunch, compare: does a resumed run equal an uninterrupted one bit for bit?

    python benchmarks/kill_resume.py [--kills 20] [--nproc 1] [--steps 60] [--save-every 3] [--seed 0]
                                     [--config tiny_calm] [--data DIR] [--autoencoder DIR] [--workdir DIR]
                                     [--set key=value ...] [--out FILE]

One uninterrupted reference run, then one run directory launched again and again with the same command:
launch i is killed (SIGKILL to the launcher and to every rank at once, as a node failure does) as soon as
metrics.jsonl shows a step >= kill point i, the kill points drawn sorted from random.Random(--seed) (raised
past the steps the previous launch logged, since a relaunch drops those only once it resumes).  The last
launch runs to the end.  Per kill: the step killed at, the step the launch had resumed from (its log's
"resumed from ..."; 0 for a fresh start), and whether every metrics line it wrote (step, loss, grad_norm,
lr, tokens) equals the reference's.  Last row: the finished run's metrics, eval.jsonl and model.safetensors
against the reference's.  --nproc 2 launches `torchrun --standalone --nproc-per-node 2`.  Without --data a
small prepared set is made from the embedded corpus; for CALM without --autoencoder a 2-step autoencoder.
"""
from __future__ import annotations

import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import common  # first: it sets the environment before anything imports DeepSpeed

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train"))
from runs import Job, final_weights, last_step, metrics  # noqa: E402  (the launch helpers of the tests)


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "calm_train", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"calm-train {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def prepare_inputs(args, work: pathlib.Path) -> tuple[str, str | None]:
    data = args.data
    if data is None:
        from data_prep.embedded import default_corpus, write_corpus_jsonl
        corpus = write_corpus_jsonl(work / "corpus.jsonl", default_corpus()[:60])
        data = str(work / "data")
        cli("prepare", "--input", str(corpus), "--tokenizer", "train:512", "--out", data, "--seq-len", "32",
            "--patch-size", "4", "--val-fraction", "0.1")
    autoencoder = args.autoencoder
    if autoencoder is None and "calm" in args.config:
        autoencoder = str(work / "autoencoder")
        cli("train", "tiny_autoencoder", f"run_dir={autoencoder}", f"data.train={data}", "train.steps=2",
            "logging.progress=false")
    return data, autoencoder


def line(row: dict) -> tuple:
    return row["step"], row["loss"], row["grad_norm"], row["lr"], row["tokens"]


def run_to_end(nproc: int, args: list[str], log: pathlib.Path) -> Job:
    job = Job(nproc, args, log)
    if job.wait(timeout=1800) != 0:
        raise SystemExit(f"launch failed:\n{job.output()[-4000:]}")
    return job


def resumed_from(output: str) -> int:
    found = re.findall(r"resumed from \S+step_(\d+) at step", output)
    return int(found[-1]) if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "kill_resume")
    parser.add_argument("--kills", type=int, default=20, help="kill points (default %(default)s)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per launch (default %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="train.steps (default %(default)s)")
    parser.add_argument("--save-every", type=int, default=3, help="train.save_every (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (default %(default)s)")
    parser.add_argument("--config", default="tiny_calm", help="named config or YAML (default %(default)s)")
    parser.add_argument("--data", help="prepared data directory (default: made from the embedded corpus)")
    parser.add_argument("--autoencoder", help="frozen autoencoder for CALM (default: a 2-step one)")
    parser.add_argument("--workdir", help="where the run directories go (default: a temporary directory)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args(argv)
    if not 1 <= args.kills <= args.steps - 2:
        parser.error(f"--kills {args.kills} needs 1 <= kills <= steps - 2 = {args.steps - 2}")
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data, autoencoder = prepare_inputs(args, work)

    def train_args(run: pathlib.Path) -> list[str]:
        extra = [f"model.autoencoder={autoencoder}"] if autoencoder else []
        return ["train", args.config, f"run_dir={run}", f"data.train={data}", f"train.steps={args.steps}",
                f"train.save_every={args.save_every}", "train.eval_every=0", "logging.progress=false", *extra,
                *args.set]

    reference, run, log = work / "reference", work / "killed", work / "launches.log"
    for path in (reference, run):
        shutil.rmtree(path, ignore_errors=True)
    run_to_end(args.nproc, train_args(reference), log)
    expected = {row["step"]: line(row) for row in metrics(reference)}

    kill_points = sorted(random.Random(args.seed).sample(range(2, args.steps), args.kills))
    rows = []
    for drawn in kill_points:
        before = last_step(run)
        target = max(drawn, before + 1)
        if target >= args.steps:
            rows.append({"kill_point": drawn, "note": "past the run's steps: skipped"})
            continue
        job = Job(args.nproc, train_args(run), log)
        job.wait_for_step(run, target, timeout=1800)
        job.kill_all()
        start = resumed_from(job.output())
        written = [line(r) for r in metrics(run) if r["step"] > start]
        rows.append({"kill_point": drawn, "killed_at": last_step(run), "resumed_from": start,
                     "lines": len(written), "equal": all(expected.get(w[0]) == w for w in written)})
    job = run_to_end(args.nproc, train_args(run), log)
    ours, theirs = final_weights(run), final_weights(reference)
    final_equal = ([line(r) for r in metrics(run)] == [line(r) for r in metrics(reference)]
                   and metrics(run, "eval.jsonl") == metrics(reference, "eval.jsonl")
                   and ours.keys() == theirs.keys() and all(bool((ours[k] == theirs[k]).all()) for k in ours))
    rows.append({"kill_point": None, "killed_at": None, "resumed_from": resumed_from(job.output()),
                 "lines": args.steps, "equal": final_equal, "note": "finished: metrics, eval, weights"})
    for row in rows:
        row["equal_text"] = {True: "yes", False: "NO", None: "-"}[row.get("equal")]

    table = common.print_table(rows, [("kill_point", "kill point", "d"), ("killed_at", "killed at step", "d"),
                                      ("resumed_from", "resumed from step", "d"), ("lines", "lines compared", "d"),
                                      ("equal_text", "equal", "s"), ("note", "", "s")],
                               title=f"kill -9 and resume: {args.config}, {args.nproc} process(es), "
                                     f"{args.steps} steps, save every {args.save_every}")
    all_equal = all(row.get("equal") is not False for row in rows)
    common.write_json(args.out, {"benchmark": "kill_resume", "machine": common.machine(), "config": args.config,
                                 "nproc": args.nproc, "steps": args.steps, "save_every": args.save_every,
                                 "seed": args.seed, "kills": len(kill_points), "rows": rows, "all_equal": all_equal,
                                 "wall_s": round(time.monotonic() - started, 1), "table": table})
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())

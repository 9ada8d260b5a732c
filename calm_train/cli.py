"""The `calm-train` command line: prepare, verify-data, train, eval, generate, convert, demo.

Each subcommand imports its implementation lazily, so `calm-train --help` answers at once.
Exit codes: 0 done, 1 a clear error (printed as one line naming the file or key and the fix),
75 a checkpoint was saved after SIGTERM/SIGUSR1 or the wall-clock limit (requeue and relaunch to resume).
"""
from __future__ import annotations

import argparse
import sys

EXIT_REQUEUE = 75


def _prepare(args) -> int:
    from data_prep.cli import run_prepare
    return run_prepare(args)


def _verify(args) -> int:
    from calm_train.data.verify import verify_dataset
    info = verify_dataset(args.dir)
    splits = ", ".join(f"{name} {split['samples']} samples" for name, split in sorted(info.splits.items()))
    print(f"ok: {args.dir}: {splits} of {info.seq_len} tokens, vocab {info.vocab_size}, K={info.patch_size}")
    return 0


def _train(args) -> int:
    from calm_train.config import load_config
    from calm_train.train.loop import run_training
    return run_training(load_config(args.config, args.overrides))


def _eval(args) -> int:
    import json
    from calm_train.train.inference import evaluate_checkpoint
    print(json.dumps(evaluate_checkpoint(args.checkpoint, data=args.data, max_tokens=args.max_tokens, seed=args.seed,
                                         samples=args.samples, train_data=args.train_data)))
    return 0


def _generate(args) -> int:
    from calm_train.train.inference import generate_text
    print(generate_text(args.checkpoint, args.prompt, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, seed=args.seed))
    return 0


def _convert(args) -> int:
    from calm_train.convert.cli import run_convert
    return run_convert(args.src, args.dst, to=args.to, tp=args.tp, pp=args.pp)


def _demo(args) -> int:
    from calm_train.demo import run_demo
    return run_demo(args.out)


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value}: the Brier estimates need >= 2 samples per position")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="corpus -> tokenizer -> K-aligned packed MDS shards")
    from data_prep.cli import add_prepare_arguments
    add_prepare_arguments(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("verify-data", help="check every shard against index.json and dataset.json")
    p.add_argument("dir")
    p.set_defaults(func=_verify)

    p = sub.add_parser("train", help="train an autoencoder, CALM or AR model (resumes from RUN_DIR/checkpoints/latest)")
    p.add_argument("config", help="a YAML path or a named config in calm_train/configs")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    p.set_defaults(func=_train)

    checkpoint_help = "a run directory (its latest checkpoint), a checkpoint directory or an exported directory"
    p = sub.add_parser("eval", help="BrierLM (CALM, AR) or reconstruction accuracy (autoencoder); prints JSON")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--data", help="prepared data directory (default: the run's validation data)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=_at_least_two, default=None, metavar="S",
                   help="CALM: head samples per position for the Brier estimates (U-statistic; default 2)")
    p.add_argument("--train-data", default=None, metavar="DIR",
                   help="CALM: prepared data whose training split is the real-chunk and marginal reference "
                        "(default: the run's data.train)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="sample a continuation of a prompt")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--prompt", required=True)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("convert", help="reshard, or export to / import from the Hugging Face layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=("hf", "native"), required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.set_defaults(func=_convert)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, on a laptop CPU")
    p.add_argument("--out", default="demo_out")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from calm_train.errors import user_errors
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        print(f"calm-train {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `calm-train` command line: prepare, verify-data, train, config, eval, generate, convert, demo.

Each subcommand imports its implementation lazily, so `calm-train --help` answers at once.
Exit codes (every command, calm_train.errors.run_command): 0 done, 1 a clear error (one line
`calm-train CMD: error: ...` naming the file or key and the fix), 2 command-line usage, 70 an internal
error (a bug: the traceback is printed), 75 a checkpoint was saved after SIGTERM/SIGUSR1 or the
wall-clock limit (requeue and relaunch to resume).
"""
from __future__ import annotations

import argparse
import functools
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


def _quiet(handler):
    """A command that loads the training stack: library notes go to stderr, once (calm_train/console.py)."""
    @functools.wraps(handler)
    def run(args):
        from calm_train.console import quiet_libraries
        quiet_libraries()
        return handler(args)
    return run


def _train(args) -> int:
    from calm_train.config import load_config
    from calm_train.train.loop import run_training
    return run_training(load_config(args.config, args.overrides))


def _config(args) -> int:
    from calm_train.config import load_config, to_yaml
    from calm_train.errors import UserError
    cfg = load_config(args.config, args.overrides)
    if cfg.data.train:
        from calm_train.train.loop import resolve_data
        try:
            resolve_data(cfg)
        except UserError as err:
            print(f"calm-train config: note: vocab_size and seq_len not taken from the data ({err})", file=sys.stderr)
    print(to_yaml(cfg), end="")
    return 0


def _eval(args) -> int:
    import json
    from calm_train.console import stdout_to_stderr
    from calm_train.train.inference import evaluate_checkpoint
    with stdout_to_stderr():
        result = evaluate_checkpoint(args.checkpoint, data=args.data, max_tokens=args.max_tokens, seed=args.seed,
                                     samples=args.samples, train_data=args.train_data)
    print(json.dumps(result))
    return 0


def _generate(args) -> int:
    from calm_train.console import stdout_to_stderr
    from calm_train.train.inference import generate_text
    with stdout_to_stderr():
        text = generate_text(args.checkpoint, args.prompt, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(args.prompt + text if args.echo else text)
    return 0


def _convert(args) -> int:
    from calm_train.convert.cli import run_convert
    return run_convert(args.src, args.dst, to=args.to, tp=args.tp, pp=args.pp)


def _demo(args) -> int:
    from calm_train.demo import run_demo
    from calm_train.storage.url import local_only
    local_only(args.out, "--out", "write the demo to a local directory")
    return run_demo(args.out)


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value}: the Brier estimates need >= 2 samples per position")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows the default of every argument that has one; keeps the line breaks of descriptions and epilogs."""

    def _get_help_string(self, action):
        help = action.help or ""
        flag = action.nargs == 0
        if action.required or action.default in (None, argparse.SUPPRESS) or flag or "%(default)" in help:
            return help
        return f"{help} (default: %(default)s)"


def _add_command(sub, name: str, help: str, func, epilog: str | None = None, quiet: bool = True):
    p = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_HelpFormatter)
    p.set_defaults(func=_quiet(func) if quiet else func)
    return p


def _named_configs_epilog() -> str:
    from calm_train.config import named_configs
    return ("named configs (calm_train/configs/): " + ", ".join(named_configs()) +
            "\nexamples: calm-train train tiny_ar run_dir=runs/ar data.train=data/web train.steps=100\n"
            "          calm-train train calm_m data.train=data/web@0.7,data/code@0.3 model.autoencoder=runs/ae\n"
            "see the resolved config first: calm-train config NAME [key=value ...]")


def build_parser() -> argparse.ArgumentParser:
    from calm_train import __version__
    from calm_train.errors import positive_int
    parser = argparse.ArgumentParser(prog="calm-train", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"calm-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add_command(sub, "prepare", "corpus -> tokenizer -> K-aligned packed MDS shards", _prepare, quiet=False)
    from data_prep.cli import add_prepare_arguments
    add_prepare_arguments(p)

    p = _add_command(sub, "verify-data", "check every shard against index.json and dataset.json", _verify,
                     quiet=False)
    p.add_argument("dir", help="a prepared data directory or URL (calm-train prepare --out DIR)")

    p = _add_command(sub, "train", "train an autoencoder, CALM or AR model (resumes from RUN_DIR/checkpoints/latest)",
                     _train, epilog=_named_configs_epilog())
    p.add_argument("config", help="a YAML path or a named config (listed below)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.steps=100 parallel.tp=2")

    p = _add_command(sub, "config", "print the fully resolved config (YAML) that `train` would run with", _config,
                     epilog=_named_configs_epilog(), quiet=False)
    p.add_argument("config", help="a YAML path or a named config (listed below)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for train")

    checkpoint_help = ("a run directory (its latest checkpoint), a checkpoint directory or an exported directory, "
                       "or the URL of a run's train.remote_checkpoints (or of one checkpoint there)")
    p = _add_command(sub, "eval", "BrierLM (CALM, AR) or reconstruction accuracy (autoencoder); prints one JSON "
                     "object on stdout", _eval)
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--data", help="prepared data directory (default: the run's validation data)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="evaluate at most this many tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled Brier estimates")
    p.add_argument("--samples", type=_at_least_two, default=None, metavar="S",
                   help="CALM: head samples per position for the Brier estimates (U-statistic; default 2)")
    p.add_argument("--train-data", default=None, metavar="DIR",
                   help="CALM: prepared data whose training split is the real-chunk and marginal reference "
                        "(default: the run's data.train)")

    p = _add_command(sub, "generate", "sample a continuation of a prompt; prints the text on stdout", _generate)
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature in [0, 1]; 0 means greedy")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate (a warning when prompt + new tokens exceed the trained context)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")

    p = _add_command(sub, "convert", "reshard, or export to / import from the Hugging Face layouts", _convert)
    p.add_argument("src", help="a run, checkpoint or exported directory")
    p.add_argument("dst", help="the directory to write")
    p.add_argument("--to", choices=("hf", "native"), required=True,
                   help="hf: Llama (AR) or the reference CALM layout; native: a calm-train checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size recorded for --to native")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size recorded for --to native")

    p = _add_command(sub, "demo", "the whole pipeline on the embedded corpus, on a laptop CPU", _demo)
    p.add_argument("--out", default="demo_out", help="output directory (summary.json, curves.png, runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from calm_train.errors import run_command
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())

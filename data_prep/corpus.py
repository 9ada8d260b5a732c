"""`python -m data_prep.corpus OUT.jsonl --source ...`: write a corpus as JSON lines.

`embedded` (the default, what `calm-train demo` trains on): English prose that ships with Python
itself (data_prep/embedded.py).  About 2 MB; sorted and stable for a given Python version.

`package_docs`: about 20 MB of prose from the documentation Debian packages ship (the Linux
kernel's, Perl's and Python's manuals), cleaned, deduplicated, and with the embedded corpus and any
--exclude file (the wikitext validation file) kept out: data_prep/package_docs.py.

`synthetic:RUNG[:key=value,...]`: documents drawn from a synthetic language of the ladder in
data_prep/synthetic/rungs.py, deterministic for --seed; beside OUT it writes OUT.val.jsonl (held-out
documents), OUT.language.json (the language: what `calm-train eval` computes the exact optimum from) and
OUT.tokenizer.json (its own tokenizer), so

    calm-train prepare --input OUT.jsonl --val-input OUT.val.jsonl --tokenizer OUT.tokenizer.json --out DIR ...

gives data whose held-out optimum is known.
"""
from __future__ import annotations

import json

from data_prep.embedded import default_corpus, write_corpus_jsonl

SYNTHETIC = "synthetic:"


def write_synthetic(out: str, spec: str, seed: int, tokens: int, val_tokens: int) -> dict:
    """The corpus of one rung (module docstring); returns its counts."""
    from data_prep.synthetic.language import write_language_corpus
    from data_prep.synthetic.rungs import build
    return write_language_corpus(out, build(spec, seed), tokens, val_tokens)


def main(argv: list[str] | None = None) -> int:
    """`python -m data_prep.corpus OUT.jsonl [--source embedded|package_docs|synthetic:RUNG] [--max-docs N] [--seed S]`"""
    import argparse
    from data_prep.synthetic.language import LanguageError
    from data_prep.synthetic.rungs import LADDER
    parser = argparse.ArgumentParser(prog="python -m data_prep.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON lines file to write")
    parser.add_argument("--source", default="embedded",
                        help="embedded: Python's own documentation (2 MB); package_docs: Debian's documentation "
                             "packages (20 MB, see data_prep/package_docs.py for its options); synthetic:RUNG[:k=v,...]: "
                             f"a synthetic language with a known optimum, RUNG one of {', '.join(LADDER)}")
    parser.add_argument("--max-docs", type=int, default=None, help="embedded: only the first N documents")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="JSONL",
                        help="package_docs: JSON lines files whose 13-word n-grams must stay out (the wikitext file)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: the language and its documents")
    parser.add_argument("--tokens", type=int, default=400_000, help="synthetic: training tokens (whole documents)")
    parser.add_argument("--val-tokens", type=int, default=20_000, help="synthetic: held-out tokens (OUT.val.jsonl)")
    args = parser.parse_args(argv)
    if args.source == "package_docs":
        if args.max_docs is not None:
            parser.error("--max-docs applies to --source embedded")
        from data_prep import package_docs
        return package_docs.main([args.out, "--exclude", *args.exclude] if args.exclude else [args.out])
    if args.source.startswith(SYNTHETIC):
        try:
            stats = write_synthetic(args.out, args.source[len(SYNTHETIC):], args.seed, args.tokens, args.val_tokens)
        except LanguageError as err:
            parser.exit(1, f"python -m data_prep.corpus: error: {err}\n")
        print(json.dumps(stats))
        return 0
    if args.source != "embedded":
        parser.error(f"--source {args.source}: use embedded, package_docs or synthetic:RUNG (RUNG one of {list(LADDER)})")
    docs = default_corpus()[:args.max_docs]
    path = write_corpus_jsonl(args.out, docs)
    print(f"{path}: {len(docs)} documents, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

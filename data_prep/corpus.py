"""Real English corpora that need no download beyond the package registries.

`embedded` (the default, what `calm-train demo` trains on): English prose that ships with Python
itself: `pydoc_data.topics` (the language reference topics) plus the docstrings of the standard
library's pure-Python modules (module, class and function docstrings of at least MIN_CHARS
characters; one document per module).  About 2 MB; sorted and stable for a given Python version.

`package_docs`: about 20 MB of prose from the documentation Debian packages ship (the Linux
kernel's, Perl's and Python's manuals), cleaned, deduplicated, and with the embedded corpus and any
--exclude file (the wikitext validation file) kept out: data_prep/package_docs.py.
"""
from __future__ import annotations

import ast
import json
import pathlib
import sysconfig

MIN_CHARS = 40
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}


def _module_docs(path: pathlib.Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                      ast.AsyncFunctionDef))]:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_CHARS:
            docs.append(doc)
    return "\n\n".join(docs)


def default_corpus() -> list[str]:
    """Documents: every pydoc topic (sorted by name), then every stdlib module's docstrings (by path)."""
    from pydoc_data import topics

    docs = [topics.topics[name].strip() for name in sorted(topics.topics)]
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_PARTS.isdisjoint(path.relative_to(stdlib).parts):
            text = _module_docs(path)
            if text:
                docs.append(text)
    return [d for d in docs if d]


def write_corpus_jsonl(path, docs: list[str] | None = None) -> pathlib.Path:
    """Write `docs` (default: default_corpus()) as JSON lines with a "text" field."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in default_corpus() if docs is None else docs:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m data_prep.corpus OUT.jsonl [--source embedded|package_docs] [--max-docs N]`: write a corpus as JSON lines."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m data_prep.corpus", description=main.__doc__)
    parser.add_argument("out", help="JSON lines file to write")
    parser.add_argument("--source", choices=("embedded", "package_docs"), default="embedded",
                        help="embedded: Python's own documentation (2 MB); package_docs: Debian's documentation "
                             "packages (20 MB, see data_prep/package_docs.py for its options)")
    parser.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="JSONL",
                        help="package_docs: JSON lines files whose 13-word n-grams must stay out (the wikitext file)")
    args = parser.parse_args(argv)
    if args.source == "package_docs":
        if args.max_docs is not None:
            parser.error("--max-docs applies to --source embedded")
        from data_prep import package_docs
        return package_docs.main([args.out, "--exclude", *args.exclude] if args.exclude else [args.out])
    docs = default_corpus()[:args.max_docs]
    path = write_corpus_jsonl(args.out, docs)
    print(f"{path}: {len(docs)} documents, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

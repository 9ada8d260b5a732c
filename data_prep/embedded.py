"""The embedded corpus: English prose that ships with Python itself, and the JSON-lines writer every corpus uses.

`pydoc_data.topics` (the language reference topics) plus the docstrings of the standard library's
pure-Python modules (module, class and function docstrings of at least MIN_CHARS characters; one
document per module).  About 2 MB; sorted and stable for a given Python version.  What `calm-train
demo` trains on, and what data_prep/package_docs.py keeps out of its corpus.
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

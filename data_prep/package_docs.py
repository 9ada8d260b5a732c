"""A larger real-English corpus from the documentation that Debian packages ship (no download but apt).

Sources (Debian 12 "bookworm"; the versions measured are in PACKAGES; any version works, the
extract records the ones it read):
  linux-doc-6.1   the Linux kernel's Documentation/ in reStructuredText (*.rst.gz, *.txt.gz)
  perl-doc        Perl's manual pages in POD (/usr/share/perl/5.*/pod/*.pod)
  python3.11-doc  the Python documentation's reStructuredText sources (html/_sources/**/*.rst.txt)
Install them with `apt-get install --no-install-recommends linux-doc-6.1 perl-doc python3.11-doc`
(or unpack the .deb files with `dpkg-deb -x` under a directory and pass it as --root).

Cleaning keeps prose paragraphs only.  A file is cut into paragraphs at blank lines; markup is
removed (reStructuredText roles, links, emphasis, section underlines, list bullets; POD commands,
formatting codes); a paragraph is dropped when it is a directive or comment (".. "), a literal block
(after a paragraph ending in "::", or a POD verbatim paragraph), a table, or not prose: fewer than
MIN_WORDS words, fewer than MIN_LETTERS of its characters letters or spaces, or code-like symbols
({ } ; = < > | _ \\ # $ @) above MAX_SYMBOLS of its characters.  Non-English directories
(translations/) and the kernel's property and attribute listings (devicetree/, ABI/) are skipped.

Deterministic and deduplicated: files are read in sorted path order per package (packages in
PACKAGES order); a paragraph whose normalised text (lowercase alphanumeric words) was seen before
is dropped, as is every paragraph that shares a 13-word n-gram (normalised the same way) with an
excluded text: the wikitext validation file, and by default the embedded corpus (data_prep.embedded),
so the two corpora can be mixed without overlap.  One document per source file (its kept
paragraphs joined by blank lines).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pathlib
import re
import subprocess
from typing import Iterable, Iterator

NGRAM = 13
MIN_WORDS = 8
MIN_LETTERS = 0.85
MAX_SYMBOLS = 0.02
SYMBOLS = set("{};=<>|_\\#$@")


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version_measured: str
    root: str               # directory below the file-system root
    patterns: tuple[str, ...]
    markup: str             # rst | pod


PACKAGES = (
    Package("linux-doc-6.1", "6.1.192-3", "usr/share/doc/linux-doc-6.1/Documentation", ("**/*.rst.gz", "**/*.txt.gz"), "rst"),
    Package("perl-doc", "5.36.0-7+deb12u4", "usr/share/perl", ("5.*/pod/*.pod",), "pod"),
    Package("python3.11-doc", "3.11.2-6+deb12u9", "usr/share/doc/python3.11/html/_sources", ("**/*.rst.txt",), "rst"),
)
SKIP_DIRS = {"translations", "devicetree", "ABI"}   # not English; property and attribute listings

_WORD = re.compile(r"[a-z0-9]+")
_RST_ROLE = re.compile(r":[\w:+.-]+:`[!~]?([^`<]*?)(?:\s*<[^`>]*>)?`")    # :ref:`text <target>` -> text
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")                   # `text <url>`_ -> text
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_REF = re.compile(r"`([^`]+)`_{0,2}")
_RST_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_RST_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)]|#\.|\([a-z0-9]\))\s+")
_POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>")
_POD_LINK_TEXT = re.compile(r"^(.*?)\|.*$")


def normal_words(text: str) -> list[str]:
    """Lowercase alphanumeric words: the normal form for duplicate and overlap checks (wikitext's
    tokenisation, `@-@` and spaced punctuation, falls away)."""
    return _WORD.findall(text.lower())


def ngram_hashes(words: list[str], n: int = NGRAM) -> set[int]:
    return {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest(), "little")
            for i in range(len(words) - n + 1)}


def _clean_rst_line(line: str) -> str:
    line = _RST_ROLE.sub(r"\1", line)
    line = _RST_LINK.sub(r"\1", line)
    line = _RST_LITERAL.sub(r"\1", line)
    line = _RST_REF.sub(r"\1", line)
    line = _RST_EMPHASIS.sub(r"\1", line)
    return _BULLET.sub("", line).strip()


def rst_paragraphs(text: str) -> Iterator[str]:
    """Prose candidates of a reStructuredText file: markup removed, directives and literal blocks dropped.

    The indented blocks after a paragraph ending in "::" or after a directive (".. x::") are skipped.
    """
    skip_indented = False
    for block in re.split(r"\n\s*\n", text):
        if skip_indented and block[:1].isspace():
            continue
        lines = [line for line in block.splitlines() if not _RST_UNDERLINE.match(line)]
        first = lines[0].strip() if lines else ""
        skip_indented = block.rstrip().endswith("::") or first.startswith("..")
        if not lines or first.startswith(("..", "+-", "|", ">>>", "$ ", "# ")):
            continue
        paragraph = " ".join(_clean_rst_line(line) for line in lines)
        yield paragraph[:-1] if paragraph.endswith("::") else paragraph


def _pod_code(match: re.Match) -> str:
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    return _POD_LINK_TEXT.sub(r"\1", inner)


def pod_paragraphs(text: str) -> Iterator[str]:
    """Prose candidates of a POD file: ordinary paragraphs and heading text; verbatim and data blocks dropped."""
    skipping = False
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        if block.startswith("=begin"):
            skipping = True
        if skipping:
            skipping = not block.startswith("=end")
            continue
        if block[:1].isspace():                        # verbatim (code)
            continue
        if block.startswith("="):
            command, _, rest = block.partition(" ")
            if command not in ("=head1", "=head2", "=head3", "=head4", "=item"):
                continue
            block = rest
        paragraph = " ".join(line.strip() for line in block.splitlines())
        for _ in range(3):                             # nested formatting codes
            paragraph = _POD_CODE.sub(_pod_code, paragraph)
        yield _BULLET.sub("", paragraph)


def is_prose(paragraph: str) -> bool:
    if len(paragraph.split()) < MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    symbols = sum(c in SYMBOLS for c in paragraph)
    return letters >= MIN_LETTERS * len(paragraph) and symbols <= MAX_SYMBOLS * len(paragraph) and paragraph.isascii()


def package_files(package: Package, root: pathlib.Path) -> list[pathlib.Path]:
    base = (root / package.root).resolve()
    files = {p.resolve() for pattern in package.patterns for p in base.glob(pattern) if p.is_file()}   # one copy per file
    return sorted(p for p in files if p.is_relative_to(base) and SKIP_DIRS.isdisjoint(p.relative_to(base).parts))


def read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def installed_version(name: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


class Exclusion:
    """13-gram hashes of texts that must stay out, and the paragraph hashes already taken."""

    def __init__(self, texts: Iterable[str] = ()):
        self.ngrams: set[int] = set()
        for text in texts:
            self.ngrams |= ngram_hashes(normal_words(text))
        self.seen: set[bytes] = set()

    def verdict(self, paragraph: str) -> str:
        """'keep', 'duplicate' or 'excluded' (and remember a kept paragraph)."""
        words = normal_words(paragraph)
        key = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
        if key in self.seen:
            return "duplicate"
        if not self.ngrams.isdisjoint(ngram_hashes(words)):
            return "excluded"
        self.seen.add(key)
        return "keep"


def package_docs(root="/", exclude_texts: Iterable[str] = (), packages=PACKAGES) -> tuple[list[str], dict]:
    """(documents, stats): the clean, deduplicated prose of every package found under `root`.

    stats[package] = {version, files, raw_bytes, kept_bytes, paragraphs, duplicates, excluded}
    (a package that is not installed under root has files 0 and version None).
    """
    root = pathlib.Path(root)
    exclusion = Exclusion(exclude_texts)
    docs, stats = [], {}
    for package in packages:
        files = package_files(package, root)
        stat = {"version": installed_version(package.name) if files and root == pathlib.Path("/") else None,
                "files": len(files), "raw_bytes": 0, "kept_bytes": 0, "paragraphs": 0, "duplicates": 0, "excluded": 0}
        split = rst_paragraphs if package.markup == "rst" else pod_paragraphs
        for path in files:
            text = read_text(path)
            stat["raw_bytes"] += len(text.encode())
            kept = []
            for paragraph in split(text):
                if not is_prose(paragraph):
                    continue
                verdict = exclusion.verdict(paragraph)
                if verdict == "keep":
                    kept.append(paragraph)
                else:
                    stat["duplicates" if verdict == "duplicate" else "excluded"] += 1
            if kept:
                doc = "\n\n".join(kept)
                docs.append(doc)
                stat["paragraphs"] += len(kept)
                stat["kept_bytes"] += len(doc.encode())
        stats[package.name] = stat
    return docs, stats


def read_jsonl_texts(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """`python -m data_prep.package_docs OUT.jsonl [--root DIR] [--exclude FILE.jsonl ...]`: write the corpus."""
    import argparse
    from data_prep.embedded import default_corpus, write_corpus_jsonl
    parser = argparse.ArgumentParser(prog="python -m data_prep.package_docs", description=main.__doc__)
    parser.add_argument("out", help="JSON lines file to write (a stats file OUT.stats.json is written beside it)")
    parser.add_argument("--root", default="/", help="file-system root the packages are installed (or unpacked) under")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="JSONL",
                        help="JSON lines files (a 'text' field) whose 13-word n-grams must not occur, e.g. the "
                             "wikitext validation file")
    parser.add_argument("--keep-embedded-overlap", action="store_true",
                        help="do not exclude the embedded corpus's n-grams")
    args = parser.parse_args(argv)
    excluded = [t for path in args.exclude for t in read_jsonl_texts(path)]
    if not args.keep_embedded_overlap:
        excluded += default_corpus()
    docs, stats = package_docs(args.root, excluded)
    if not docs:
        parser.exit(1, f"python -m data_prep.package_docs: error: none of {[p.name for p in PACKAGES]} is installed "
                       f"under {args.root}. Fix: apt-get install --no-install-recommends "
                       f"{' '.join(p.name for p in PACKAGES)}\n")
    path = write_corpus_jsonl(args.out, docs)
    total = {"documents": len(docs), "bytes": path.stat().st_size,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "packages": stats,
             "excluded_files": args.exclude, "embedded_corpus_excluded": not args.keep_embedded_overlap}
    pathlib.Path(str(path) + ".stats.json").write_text(json.dumps(total, indent=1) + "\n")
    for name, stat in stats.items():
        print(f"{name} {stat['version']}: {stat['files']} files, {stat['raw_bytes'] / 1e6:.1f} MB read -> "
              f"{stat['kept_bytes'] / 1e6:.2f} MB of prose ({stat['duplicates']} duplicate, {stat['excluded']} excluded "
              "paragraphs)")
    print(f"{path}: {len(docs)} documents, {total['bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The data of the GPU run's learning part (benchmarks/learning_gpu.py), prepared here and carried there.

    python benchmarks/gpu_data.py [--out .gpu/data] [--vocab 2048] [--seq-len 256] [--wikitext FILE]
                                  [--corpus FILE.jsonl] [--known-answer DIR]

OUT/docs/      the Debian documentation corpus (data_prep.package_docs: linux-doc-6.1, perl-doc and
               python3.11-doc; when they are not installed their .deb files are fetched with `apt-get download`
               and unpacked under .gpu/debs/root, no install), deduplicated against the wikitext file and the
               embedded corpus: byte-level BPE of --vocab trained on it, --seq-len tokens per sample, K = 4,
               5 % validation; MDS shards compressed with zstd (`calm-train prepare`)
OUT/wikitext/  the wikitext file (default: the shared data directory beside the checkout, which does not travel
               to the GPU machine) tokenized with OUT/docs's tokenizer, one train split: the held-out text
OUT/known_answer/  with --known-answer DIR: a copy of that prepared directory (a known-answer rung's data, for
               `gpu_run.sh --known-answer .gpu/data/known_answer`)

--corpus FILE.jsonl replaces the Debian corpus by any JSON-lines file (the CPU dry run in the tests).
Writes OUT/data.json (sizes, token counts, the commands) and prints the sizes.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402,F401  (the offline environment before anything imports DeepSpeed)

REPO = pathlib.Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext" / "wikitext_document_level-test.json"
K = 4


def debian_docs_root(debs: pathlib.Path) -> pathlib.Path:
    """'/' when the three packages are installed, else their .deb files unpacked under debs/root."""
    from data_prep.package_docs import PACKAGES, package_files
    if all(package_files(p, pathlib.Path("/")) for p in PACKAGES):
        return pathlib.Path("/")
    root = debs / "root"
    if all(package_files(p, root) for p in PACKAGES):
        return root
    debs.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in PACKAGES]
    print(f"gpu_data: apt-get download {' '.join(names)} -> {debs}", flush=True)
    if subprocess.run(["apt-get", "download", *names], cwd=debs).returncode != 0:
        raise SystemExit(f"gpu_data: apt-get download {' '.join(names)} failed. Fix: run `apt-get update` first, "
                         "or install the packages, or pass --corpus FILE.jsonl")
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def docs_jsonl(work: pathlib.Path, wikitext: pathlib.Path) -> pathlib.Path:
    from data_prep.corpus import default_corpus, write_corpus_jsonl
    from data_prep.package_docs import package_docs, read_jsonl_texts
    path = work / "docs.jsonl"
    if not path.is_file():
        root = debian_docs_root(work.parent / "debs")
        docs, stats = package_docs(root, read_jsonl_texts(wikitext) + default_corpus())
        if not docs:
            raise SystemExit(f"gpu_data: no documentation found under {root} ({stats})")
        write_corpus_jsonl(path, docs)
    return path


def prepare(args: list[str]) -> None:
    from data_prep.cli import main as prepare_main
    if prepare_main(args) != 0:
        raise SystemExit(f"gpu_data: calm-train prepare {' '.join(args)} failed")


def folder_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / ".gpu" / "data")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--wikitext", type=pathlib.Path, default=WIKITEXT)
    parser.add_argument("--corpus", type=pathlib.Path, default=None, help="a JSON-lines corpus instead of the Debian docs")
    parser.add_argument("--known-answer", type=pathlib.Path, default=None, help="a prepared directory to carry too")
    args = parser.parse_args(argv)
    if not args.wikitext.is_file():
        raise SystemExit(f"gpu_data: the wikitext file {args.wikitext} is missing. Fix: pass --wikitext FILE "
                         "(wikitext_document_level-test.json of the shared data directory)")
    if args.known_answer is not None and not (args.known_answer / "dataset.json").is_file():
        raise SystemExit(f"gpu_data: --known-answer {args.known_answer} has no dataset.json. Fix: pass a "
                         "`calm-train prepare` output (a known-answer rung's prepared data)")
    from calm_train.data.dataset_info import read_dataset_info
    work = args.out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or docs_jsonl(work, args.wikitext)
    shape = ["--seq-len", str(args.seq_len), "--patch-size", str(K)]
    docs, wikitext = args.out / "docs", args.out / "wikitext"
    prepare(["--input", str(corpus), "--tokenizer", f"train:{args.vocab}", "--out", str(docs), *shape,
             "--val-fraction", "0.05", "--overwrite"])
    prepare(["--input", str(args.wikitext), "--tokenizer", str(docs / "tokenizer.json"), "--out", str(wikitext),
             *shape, "--val-fraction", "0", "--overwrite"])
    folders = {"docs": docs, "wikitext": wikitext}
    if args.known_answer is not None:
        target = args.out / "known_answer"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(args.known_answer, target)
        folders["known_answer"] = target
    report = {"corpus": "debian docs" if args.corpus is None else str(args.corpus.name),
              "vocab": args.vocab, "seq_len": args.seq_len, "patch_size": K, "datasets": {}}
    for name, path in folders.items():
        info = read_dataset_info(path)
        report["datasets"][name] = {"bytes": folder_bytes(path), "vocab_size": info.vocab_size,
                                    "tokens": {split: s["tokens"] for split, s in info.splits.items()}}
        print(f"gpu_data: {path}: {folder_bytes(path) / 2 ** 20:.2f} MiB, tokens "
              f"{report['datasets'][name]['tokens']}", flush=True)
    (args.out / "data.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

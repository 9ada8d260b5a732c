"""Carry a wheel too large for one transfer in parts, and join them with a sha256 check.

    python benchmarks/wheel_parts.py split WHEEL --out-dir DIR [--part-mib 30]
    python benchmarks/wheel_parts.py join --from DIR [DIR ...] --to DIR

split writes WHEEL.part-00, -01, ... and WHEEL.parts.json (name, size and sha256 of the wheel and of
every part) into DIR.  join reads every *.parts.json in the --from folders, takes each part from the
first folder that holds it, checks each part's sha256 and the joined wheel's, and writes the wheel
into --to.  A missing or damaged part stops it (exit 1) with one line naming the part and the folders
searched; nothing is written then.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

MIB = 2 ** 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(wheel: pathlib.Path, out_dir: pathlib.Path, part_mib: int) -> list[pathlib.Path]:
    data = wheel.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    size = part_mib * MIB
    parts = []
    for index, start in enumerate(range(0, len(data), size)):
        chunk = data[start:start + size]
        path = out_dir / f"{wheel.name}.part-{index:02d}"
        path.write_bytes(chunk)
        parts.append({"name": path.name, "bytes": len(chunk), "sha256": sha256(chunk)})
    manifest = {"wheel": wheel.name, "bytes": len(data), "sha256": sha256(data), "parts": parts}
    (out_dir / f"{wheel.name}.parts.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return [out_dir / p["name"] for p in parts]


def join(sources: list[pathlib.Path], to_dir: pathlib.Path) -> list[pathlib.Path]:
    manifests = {}
    for folder in sources:
        for path in sorted(folder.glob("*.parts.json")):
            manifests.setdefault(path.name, json.loads(path.read_text()))
    written = []
    for manifest in manifests.values():
        chunks = []
        for part in manifest["parts"]:
            found = [folder / part["name"] for folder in sources if (folder / part["name"]).is_file()]
            good = [p for p in found if p.stat().st_size == part["bytes"] and sha256(p.read_bytes()) == part["sha256"]]
            if not good:
                state = "damaged (size or sha256 differ)" if found else "missing"
                raise SystemExit(f"wheel_parts: {part['name']} of {manifest['wheel']} is {state} in "
                                 f"{[str(s) for s in sources]}; carry it again")
            chunks.append(good[0].read_bytes())
        data = b"".join(chunks)
        if len(data) != manifest["bytes"] or sha256(data) != manifest["sha256"]:
            raise SystemExit(f"wheel_parts: the joined {manifest['wheel']} has sha256 {sha256(data)}, "
                             f"expected {manifest['sha256']}; carry its parts again")
        to_dir.mkdir(parents=True, exist_ok=True)
        target = to_dir / manifest["wheel"]
        target.write_bytes(data)
        written.append(target)
        print(f"wheel_parts: joined {target} ({len(data) / MIB:.1f} MiB, sha256 {manifest['sha256'][:16]}... ok)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("wheel", type=pathlib.Path)
    s.add_argument("--out-dir", type=pathlib.Path, required=True)
    s.add_argument("--part-mib", type=int, default=30)
    j = sub.add_parser("join")
    j.add_argument("--from", dest="sources", type=pathlib.Path, nargs="+", required=True)
    j.add_argument("--to", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "split":
        for path in split(args.wheel, args.out_dir, args.part_mib):
            print(f"wheel_parts: wrote {path} ({path.stat().st_size / MIB:.1f} MiB)")
    else:
        join([s for s in args.sources if s.is_dir()], args.to)
    return 0


if __name__ == "__main__":
    sys.exit(main())

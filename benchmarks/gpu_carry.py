"""Lay out what the GPU run carries over transfers of at most 64 MiB each, and join it there with sha256 checks.

    python benchmarks/gpu_carry.py plan [--limit-mib 64] [--margin-mib 1]      # here, after gpu_wheels.sh, gpu_data.py
    python benchmarks/gpu_carry.py join --from DIR [DIR ...] --to DIR           # there (gpu_run.sh does it)

One transfer carries the working tree (tracked and untracked-not-ignored files, measured here with git) and
the paths it names.  `plan` puts everything the run cannot do without (.whl/: the wheels; .gpu/data/: the
prepared data) in the LAST transfer, the one that runs `bash benchmarks/gpu_run.sh`, and splits each wheel of
.gpu/big/ (the 88 MiB CuTe-DSL compiler of flash-attn-4) into parts: what is left of the last transfer takes
the last part, earlier transfers (`bash benchmarks/gpu_run.sh --stash`, back to back: the machine stays warm
~30 s) take one part each; the parts are sized so that every transfer sends about as many bytes (the most
headroom under the limit for each), and as few transfers as the limit allows.  Call folders .gpu/call-1 ... .gpu/call-N hold the parts and the manifest
WHEEL.parts.json (name, size and sha256 of the wheel and of every part); .gpu/calls.json lists, per call, the
paths to carry, the command and the bytes that travel.  If an earlier transfer is lost (the machine went back
between the calls), the run still runs, without flash-attn-4, and says so.

`join` reads every *.parts.json in the --from folders, takes each part from the first folder that holds it,
checks each part's sha256 and the joined wheel's, and writes the wheel into --to.  A missing or damaged part
stops it (exit 1) with one line naming the part and the folders searched; nothing is written then.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

MIB = 2 ** 20
REPO = pathlib.Path(__file__).resolve().parents[1]
ESSENTIAL = (".whl", ".gpu/data")          # carried by the last call, which runs the script
BIG = ".gpu/big"
CALL_DIR = ".gpu/call-{}"
RUN, STASH = "bash benchmarks/gpu_run.sh", "bash benchmarks/gpu_run.sh --stash"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(wheel: pathlib.Path, out_dirs: list[pathlib.Path], sizes: list[int]) -> dict:
    """Cut `wheel` into len(sizes) parts (the last takes the rest), part i into out_dirs[i]; the manifest goes into
    every folder that holds a part.  Returns the manifest."""
    data = wheel.read_bytes()
    parts, start = [], 0
    for index, (folder, size) in enumerate(zip(out_dirs, sizes)):
        chunk = data[start:] if index == len(sizes) - 1 else data[start:start + size]
        start += len(chunk)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{wheel.name}.part-{index:02d}"
        path.write_bytes(chunk)
        parts.append({"name": path.name, "bytes": len(chunk), "sha256": sha256(chunk)})
    manifest = {"wheel": wheel.name, "bytes": len(data), "sha256": sha256(data), "parts": parts}
    for folder in dict.fromkeys(out_dirs):
        (folder / f"{wheel.name}.parts.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


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
                raise SystemExit(f"gpu_carry: {part['name']} of {manifest['wheel']} is {state} in "
                                 f"{[str(s) for s in sources]}; carry it again")
            chunks.append(good[0].read_bytes())
        data = b"".join(chunks)
        if len(data) != manifest["bytes"] or sha256(data) != manifest["sha256"]:
            raise SystemExit(f"gpu_carry: the joined {manifest['wheel']} has sha256 {sha256(data)}, "
                             f"expected {manifest['sha256']}; carry its parts again")
        to_dir.mkdir(parents=True, exist_ok=True)
        target = to_dir / manifest["wheel"]
        target.write_bytes(data)
        written.append(target)
        print(f"gpu_carry: joined {target} ({len(data) / MIB:.1f} MiB, sha256 {manifest['sha256'][:16]}... ok)")
    return written


def tree_bytes(repo: pathlib.Path) -> int:
    """Bytes of what every transfer sends besides the carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.decode().split("\0")
    return sum((repo / n).stat().st_size for n in names if n and (repo / n).is_file())


def path_bytes(path: pathlib.Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plan(repo: pathlib.Path, limit: int, margin: int) -> list[dict]:
    """Write .gpu/call-*/ and .gpu/calls.json (module docstring); returns the calls."""
    missing = [p for p in ESSENTIAL if not (repo / p).is_dir()]
    if missing:
        raise SystemExit(f"gpu_carry: {missing} missing. Fix: run benchmarks/gpu_wheels.sh and benchmarks/gpu_data.py "
                         "first (benchmarks/gpu_prepare.sh runs all three)")
    tree = tree_bytes(repo)
    essential = sum(path_bytes(repo / p) for p in ESSENTIAL)
    budget = limit - margin - tree                      # what one transfer may carry besides the tree
    room_last = budget - essential
    if room_last < 0:
        raise SystemExit(f"gpu_carry: the tree ({tree / MIB:.1f} MiB) + {' + '.join(ESSENTIAL)} ({essential / MIB:.1f} "
                         f"MiB) exceed one transfer ({(limit - margin) / MIB:.1f} MiB). Fix: carry less data "
                         "(gpu_data.py --seq-len/--vocab) or remove large untracked files from the checkout")
    big = sorted((repo / BIG).glob("*.whl"))
    total = sum(w.stat().st_size for w in big)
    earlier = -(-max(0, total - room_last) // budget)   # transfers before the last
    # the same bytes in every transfer (the most headroom under the limit for each)
    per_call = -(-(tree * (earlier + 1) + essential + total) // (earlier + 1))
    capacity = [per_call - tree] * earlier + [per_call - tree - essential]
    for old in sorted((repo / ".gpu").glob("call-*")):
        shutil.rmtree(old)
    folders = [repo / CALL_DIR.format(i + 1) for i in range(earlier + 1)]
    for folder in folders:
        folder.mkdir(parents=True)
    call = 0
    for wheel in big:
        left, dirs, sizes = wheel.stat().st_size, [], []
        while left:
            while capacity[call] == 0:
                call += 1
            take = min(left, capacity[call])
            dirs.append(folders[call])
            sizes.append(take)
            capacity[call] -= take
            left -= take
        split(wheel, dirs, sizes)
    calls = []
    for i, folder in enumerate(folders):
        last = i == len(folders) - 1
        carry = [*ESSENTIAL, str(folder.relative_to(repo))] if last else [str(folder.relative_to(repo))]
        carried = sum(path_bytes(repo / p) for p in carry)
        calls.append({"call": i + 1, "carry": carry, "command": RUN if last else STASH, "tree_bytes": tree,
                      "carried_bytes": carried, "total_bytes": tree + carried, "limit_bytes": limit})
    (repo / ".gpu" / "calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    return calls


def print_plan(calls: list[dict]) -> None:
    for c in calls:
        print(f"call {c['call']} of {len(calls)}: carry {json.dumps(c['carry'])}  command: {c['command']}\n"
              f"    tree {c['tree_bytes'] / MIB:.2f} MiB + carried {c['carried_bytes'] / MIB:.2f} MiB = "
              f"{c['total_bytes'] / MIB:.2f} MiB of {c['limit_bytes'] / MIB:.0f} MiB")
    if len(calls) > 1:
        print("make the calls back to back (the machine stays warm ~30 s after each); the last one runs the check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--limit-mib", type=float, default=64)
    p.add_argument("--margin-mib", type=float, default=1)
    j = sub.add_parser("join")
    j.add_argument("--from", dest="sources", type=pathlib.Path, nargs="+", required=True)
    j.add_argument("--to", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "plan":
        print_plan(plan(REPO, int(args.limit_mib * MIB), int(args.margin_mib * MIB)))
    else:
        join([s for s in args.sources if s.is_dir()], args.to)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Nothing in a run directory is ever unpickled.

A payload (a pickle whose loading creates a marker file) is planted in every file of a CALM checkpoint in turn,
its manifest re-hashed so that verification passes; resume (`train` of the finished run), `eval` and `generate`
each either do not read the file or stop with one line naming it; the marker never appears.  The previous
format's pickles (DeepSpeed's engine/ files, rng/rank_N.pt) planted beside are never opened.  The package
itself holds no unpickling call: `torch.load` only with weights_only=True, no pickle module.
"""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import payload  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
LEGACY = ("engine/state/mp_rank_00_model_states.pt", "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "rng/rank_00000.pt")

SCRIPT = """
import contextlib, io, json, pathlib, sys
sys.path.insert(0, sys.argv[1])
from runs import rehash
from calm_train.cli import main
run, data, ae, marker, payload_file = map(pathlib.Path, sys.argv[2:7])
legacy = json.loads(sys.argv[7])
ckpt = run / "checkpoints" / "step_00000002"
payload = payload_file.read_bytes()
commands = {
    "train": ["train", "tiny_calm", f"run_dir={run}", f"data.train={data}", f"model.autoencoder={ae}",
              "train.steps=2", "train.save_every=1", "logging.progress=false"],
    "eval": ["eval", str(ckpt), "--max-tokens", "64"],
    "generate": ["generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "4"]}


def each_command():
    results = {}
    for name, argv in commands.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[name] = {"code": code, "err": err.getvalue(), "unpickled": marker.exists()}
    return results


results = {}
for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"):
    rel, original = str(path.relative_to(ckpt)), path.read_bytes()
    path.write_bytes(payload)
    rehash(ckpt, rel)
    results[rel] = each_command()
    path.write_bytes(original)
    rehash(ckpt, rel)
for rel in legacy:
    (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
    (ckpt / rel).write_bytes(payload)
    rehash(ckpt, rel)
results["format 1 pickles"] = each_command()
print(json.dumps(results))
"""

# what each command must read (and so refuse when it holds a payload); the other files it may not read at all
# (`train` of the finished run reads its state.json, says the run is finished and loads nothing more)
READ_BY = {"train": {"state.json"},
           "eval": {"config.yaml", "model.safetensors", "tokenizer/dataset.json", "tokenizer/tokenizer.json",
                    "autoencoder.safetensors", "autoencoder.yaml"}}
READ_BY["generate"] = READ_BY["eval"]


@pytest.mark.timeout(900)
def test_a_payload_in_any_checkpoint_file_is_never_unpickled(tiny_calm_run, tiny_ae, tiny_data, tmp_path):
    import shutil
    run, marker = tmp_path / "calm", tmp_path / "unpickled"
    shutil.copytree(tiny_calm_run, run)
    (tmp_path / "payload").write_bytes(payload(marker))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(pathlib.Path(__file__).parent), str(run), str(tiny_data),
                           str(tiny_ae), str(marker), str(tmp_path / "payload"), json.dumps(LEGACY)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert not marker.exists()
    assert set(READ_BY["eval"]) | set(READ_BY["train"]) <= set(results)
    for rel, commands in results.items():
        for name, result in commands.items():
            assert not result["unpickled"] and "Traceback" not in result["err"], (rel, name, result["err"][-2000:])
            if rel in READ_BY[name]:
                errors = [line for line in result["err"].splitlines() if "error:" in line]
                assert result["code"] == 1 and len(errors) == 1, (rel, name, result["err"][-2000:])
                assert errors[0].startswith(f"calm-train {name}: error: ") and str(run) in errors[0], errors
                assert rel.split("/")[0] in errors[0] and "Fix:" in errors[0], (rel, name, errors)
            else:
                assert result["code"] == 0, (rel, name, result["err"][-2000:])


UNPICKLERS = ("load", "loads", "Unpickler")


def unpickling_calls(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        # importing pickle for its exception type is harmless; its loaders and dill are not
        if isinstance(node, ast.Import):
            found += [f"{path}:{node.lineno} imports {a.name}" for a in node.names if a.name.split(".")[0] == "dill"]
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "dill"):
            found += [f"{path}:{node.lineno} imports {a.name} from {node.module}" for a in node.names
                      if node.module.startswith("dill") or a.name in UNPICKLERS]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle" \
                and node.attr in UNPICKLERS:
            found.append(f"{path}:{node.lineno} uses pickle.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name):
            flags = {kw.arg: getattr(kw.value, "value", None) for kw in node.keywords}
            if node.func.value.id == "torch" and flags.get("weights_only") is not True:
                found.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if node.func.value.id in ("np", "numpy") and flags.get("allow_pickle") is not False \
                    and "allow_pickle" in flags:
                found.append(f"{path}:{node.lineno} numpy.load with allow_pickle")
    return found


def test_the_package_holds_no_unpickling_call():
    found = [hit for package in ("calm_train", "data_prep") for path in sorted((REPO / package).rglob("*.py"))
             for hit in unpickling_calls(path)]
    assert found == []

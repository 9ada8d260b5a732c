"""The command line: it explains itself (--version, help text and defaults on every argument, the named configs in
`train --help`, `calm-train config` printing the resolved config), and its exit codes (DESIGN.md "Exit codes"):
each command on a bad input, as a real process, ends with exit 1 and one line `calm-train CMD: error: ...` naming
the file or key (no traceback), or exit 2 for command-line usage; an internal error exits 70 with its traceback."""
import argparse
import json
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

import calm_train
from calm_train.cli import build_parser, main
from calm_train.config import config_from_tree, load_config, named_configs
from tests.convert.conftest import tiny_model_config, write_checkpoint


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action, = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"calm-train {calm_train.__version__}"


def test_every_command_and_argument_has_help_and_shows_its_default():
    parser = build_parser()
    commands = _subparsers(parser)
    listed = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    assert set(commands) == set(listed) and all(listed.values())
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help"
            shows_default = action.default not in (None, False, argparse.SUPPRESS) and not action.required
            if shows_default and "%(default)" not in action.help:
                assert f"(default: {action.default})" in text, (name, action.dest)


def test_train_help_lists_the_named_configs():
    text = _subparsers(build_parser())["train"].format_help()
    assert all(name in text for name in named_configs()) and "calm-train config" in text


def test_config_prints_the_resolved_config(tiny_data, capsys):
    assert main(["config", "tiny_ar", "train.steps=7", f"data.train={tiny_data}@1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_tree(printed)
    assert cfg.train.steps == 7 and cfg.data.train[0].path == str(tiny_data)
    assert cfg.model.vocab_size == 512 and cfg.data.seq_len == 32             # taken from dataset.json
    expected = load_config("tiny_ar", ["train.steps=7", f"data.train={tiny_data}@1"])
    expected.model.vocab_size, expected.data.seq_len = 512, 32
    assert cfg == expected


def _hf_dir(path: pathlib.Path, config: str) -> pathlib.Path:
    """A Hugging Face-layout directory: `config` as config.json beside one small intact safetensors file."""
    from safetensors.torch import save_file
    path.mkdir()
    (path / "config.json").write_text(config)
    save_file({"model.embed_tokens.weight": torch.zeros(512, 32)}, str(path / "model.safetensors"))
    return path


def _llama(**changed) -> str:
    return json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "vocab_size": 512, **changed})


def _crafted_checkpoint(src: pathlib.Path, dst: pathlib.Path, name: str, text: str) -> pathlib.Path:
    """A copy of the run `src` whose checkpoint holds `text` as `name`, recorded in its manifest as a writer would."""
    import shutil
    from calm_train.convert.native import resolve_checkpoint, write_manifest
    shutil.copytree(src, dst)
    ckpt = resolve_checkpoint(dst)
    (ckpt / name).write_text(text)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, manifest.pop("step"), {k: v for k, v in manifest.items() if k not in ("format", "files")})
    return dst


@pytest.fixture(scope="module")
def inputs(tiny_data, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Checkpoints (AR, CALM) and crafted copies of them, prepared data with a path, a symbolic link or an unknown
    column type, a broken YAML, HF directories with a truncated, malformed or lying config or weights, a held
    prepare lock."""
    import shutil
    from calm_train.models.ar import ARModel
    from calm_train.models.autoencoder import Autoencoder
    from calm_train.models.calm import CALM
    from calm_train.parallel import runtime
    from data_prep.staging import Staging
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_data / "tokenizer.json"
    with runtime.single_process(seed=0):
        write_checkpoint(root / "ar", tiny_model_config("ar", 512), ARModel(tiny_model_config("ar", 512)), tokenizer)
        calm = tiny_model_config("calm", 512)
        write_checkpoint(root / "calm", calm, CALM(calm), tokenizer, Autoencoder(calm.ae, 512, calm.patch_size))
    shutil.copytree(tiny_data, root / "escaping")
    info = json.loads((root / "escaping" / "dataset.json").read_text())
    (root / "escaping" / "dataset.json").write_text(json.dumps(dict(info, tokenizer_files=["../../x.json"])))
    shutil.copytree(tiny_data, root / "linked")
    (root / "secret").write_text("a secret")
    (root / "secret").chmod(0o600)
    (root / "linked" / "notes.json").symlink_to(root / "secret")
    (root / "linked" / "dataset.json").write_text(json.dumps(dict(info, tokenizer_files=[
        *info["tokenizer_files"], "notes.json"])))
    shutil.copytree(tiny_data, root / "columns")
    index = json.loads((root / "columns" / "val" / "index.json").read_text())
    index["shards"][0]["column_encodings"] = ["ndarray:complex7:32"]
    (root / "columns" / "val" / "index.json").write_text(json.dumps(index))
    (root / "broken.yaml").write_text("base: tiny_ar\ntrain:\n  steps: 3\n lr: 1.0e-3\n")
    hf = _hf_dir(root / "hf", _llama())
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:len(data) // 2])
    (root / "empty").mkdir()
    (root / "link").symlink_to(root / "empty")
    (root / "a_file").write_text("not a directory")
    bomb = "".join(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 4)}]\n" for n in range(1, 6))
    lock = Staging(root / "busy")
    with lock.locked(exclusive=False):          # a prepare of --out busy is running (an array task)
        yield {"root": root, "data": tiny_data, "ar": root / "ar", "calm": root / "calm", "escaping": root / "escaping",
               "linked": root / "linked", "columns": root / "columns", "broken": root / "broken.yaml", "hf": hf,
               "file": root / "a_file", "link": root / "link",
               "bomb": _crafted_checkpoint(root / "ar", root / "bomb", "config.yaml", "l0: &l0 [x]\n" + bomb),
               "no_identity": _crafted_checkpoint(root / "ar", root / "no_identity", "state.json", json.dumps(
                   {"progress": {"step": 3, "samples": 0, "tokens": 0}, "identity": {}})),
               "deep": _hf_dir(root / "deep", _llama(num_hidden_layers=1000000)),
               "malformed": _hf_dir(root / "malformed", _llama()[:-9]),
               "no_heads": _hf_dir(root / "no_heads", _llama(num_attention_heads=0)),
               "text_size": _hf_dir(root / "text_size", _llama(hidden_size="64"))}


def cases(p: dict[str, pathlib.Path]) -> list[tuple[list[str], int, str]]:
    """(arguments, exit code, text the last line of stderr holds)."""
    root = p["root"]
    return [
        (["prepare", "--input", str(root / "nothing.jsonl"), "--tokenizer", "train:300", "--out", str(root / "o")],
         1, f"--input {root / 'nothing.jsonl'}: no such file"),
        (["prepare", "--input", str(p["data"] / "dataset.json"), "--tokenizer", "train:300", "--out",
          str(root / "busy")], 1, f"--out {root / 'busy'}: another prepare of it is running"),
        (["verify-data", str(p["escaping"])], 1, "'../../x.json' is not a plain file name"),
        (["verify-data", str(p["columns"])], 1, "not one column 'tokens' of ndarray:uint32:32"),
        (["train", str(p["broken"])], 1, f"{p['broken']}:4:2: not valid YAML"),
        (["train", "tiny_ar", f"data.train={p['data']}", f"run_dir={root / 'zero'}", "model.backbone.hidden_size=0"],
         1, "config key 'model.backbone.hidden_size': 0 must be >= 1"),
        (["train", "tiny_ar", f"data.train={p['data']}", f"run_dir={root / 'nan'}", "train.lr=nan"],
         1, "config key 'train.lr': nan is not a finite number"),
        (["train", "tiny_ar", f"data.train={p['linked']}", f"run_dir={root / 'linked_run'}"], 1,
         f"{p['linked'] / 'notes.json'}: a symbolic link to {root / 'secret'}"),
        (["train", "tiny_ar", f"data.train={p['data']}", f"run_dir={p['no_identity']}"], 1,
         "state.json: identity is {}, not a record with model and tokenizer_sha256"),
        (["eval", str(root / "no_run")], 1, str(root / "no_run")),
        (["eval", str(p["ar"]), "--max-tokens", "-5"], 2, "argument --max-tokens: '-5' is not an integer >= 1"),
        (["eval", str(p["bomb"])], 1, "anchors and aliases (&name, *name) are refused"),
        (["eval", str(p["calm"]), "--data", str(p["data"]), "--samples", "200000"], 1,
         "--samples 200000 is more than the "),
        (["generate", str(p["ar"]), "--prompt", ""], 1, "--prompt '' has no tokens"),
        (["generate", str(p["ar"]), "--prompt", "x", "--max-new-tokens", "-1"], 2, "'-1' is not an integer >= 1"),
        (["generate", str(p["deep"]), "--prompt", "x"], 1, "num_hidden_layers = 1000000, but"),
        (["generate", str(p["malformed"]), "--prompt", "x"], 1, f"{p['malformed'] / 'config.json'}: not valid JSON"),
        (["generate", str(p["no_heads"]), "--prompt", "x"], 1, "'num_attention_heads' is 0, not a positive integer"),
        (["generate", str(p["text_size"]), "--prompt", "x"], 1, "'hidden_size' is '64', not a positive integer"),
        (["convert", str(p["hf"]), str(root / "native"), "--to", "native"], 1,
         f"{p['hf'] / 'model.safetensors'} cannot be read"),
        (["convert", str(p["ar"]), str(p["link"]), "--to", "hf"], 1, f"{p['link']} is a symbolic link"),
        (["demo", "--out", str(p["file"])], 1, str(p["file"])),
    ]


def test_every_command_on_bad_input_exits_1_or_2_with_one_line(inputs):
    launched = [(args, code, text, subprocess.Popen([sys.executable, "-m", "calm_train", *args], text=True,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                for args, code, text in cases(inputs)]
    for args, code, text, proc in launched:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{args}:\n{err[-3000:]}"
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"calm-train {args[0]}: error: ") and text in line, f"{args}: {line}"
    for name in ("zero", "nan", "native", "o", "linked_run/tokenizer", ".partial-link", "empty/config.json"):
        assert not (inputs["root"] / name).exists(), f"{name} was written before the error"


def test_internal_error_exits_70_with_its_traceback(tiny_data, monkeypatch, capsys):
    import calm_train.data.verify

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(calm_train.data.verify, "verify_dataset", broken)
    assert main(["verify-data", str(tiny_data)]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("calm-train verify-data: internal error")

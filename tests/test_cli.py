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


@pytest.fixture(scope="module")
def inputs(tiny_data, tmp_path_factory) -> dict[str, pathlib.Path]:
    """An AR checkpoint, prepared data with a path in dataset.json, a broken YAML, a truncated HF checkpoint."""
    import shutil
    from safetensors.torch import save_file
    from calm_train.models.ar import ARModel
    from calm_train.parallel import runtime
    root = tmp_path_factory.mktemp("cli")
    with runtime.single_process(seed=0):
        write_checkpoint(root / "ar", tiny_model_config("ar", 512), ARModel(tiny_model_config("ar", 512)),
                         tiny_data / "tokenizer.json")
    shutil.copytree(tiny_data, root / "escaping")
    info = json.loads((root / "escaping" / "dataset.json").read_text())
    (root / "escaping" / "dataset.json").write_text(json.dumps(dict(info, tokenizer_files=["../../x.json"])))
    (root / "broken.yaml").write_text("base: tiny_ar\ntrain:\n  steps: 3\n lr: 1.0e-3\n")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
                                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "vocab_size": 512}))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 32)}, str(hf / "model.safetensors"))
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:len(data) // 2])
    (root / "a_file").write_text("not a directory")
    return {"root": root, "data": tiny_data, "ar": root / "ar", "escaping": root / "escaping",
            "broken": root / "broken.yaml", "hf": hf, "file": root / "a_file"}


def cases(p: dict[str, pathlib.Path]) -> list[tuple[list[str], int, str]]:
    """(arguments, exit code, text the last line of stderr holds)."""
    root = p["root"]
    return [
        (["prepare", "--input", str(root / "nothing.jsonl"), "--tokenizer", "train:300", "--out", str(root / "o")],
         1, f"--input {root / 'nothing.jsonl'}: no such file"),
        (["verify-data", str(p["escaping"])], 1, "'../../x.json' is not a plain file name"),
        (["train", str(p["broken"])], 1, f"{p['broken']}:4:2: not valid YAML"),
        (["train", "tiny_ar", f"data.train={p['data']}", f"run_dir={root / 'zero'}", "model.backbone.hidden_size=0"],
         1, "config key 'model.backbone.hidden_size': 0 must be >= 1"),
        (["train", "tiny_ar", f"data.train={p['data']}", f"run_dir={root / 'nan'}", "train.lr=nan"],
         1, "config key 'train.lr': nan is not a finite number"),
        (["eval", str(root / "no_run")], 1, str(root / "no_run")),
        (["eval", str(p["ar"]), "--max-tokens", "-5"], 2, "argument --max-tokens: '-5' is not an integer >= 1"),
        (["generate", str(p["ar"]), "--prompt", ""], 1, "--prompt '' has no tokens"),
        (["generate", str(p["ar"]), "--prompt", "x", "--max-new-tokens", "-1"], 2, "'-1' is not an integer >= 1"),
        (["convert", str(p["hf"]), str(root / "native"), "--to", "native"], 1,
         f"{p['hf'] / 'model.safetensors'} cannot be read"),
        (["demo", "--out", str(p["file"])], 1, str(p["file"])),
    ]


def test_every_command_on_bad_input_exits_1_or_2_with_one_line(inputs):
    launched = [(args, code, text, subprocess.Popen([sys.executable, "-m", "calm_train", *args], text=True,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                for args, code, text in cases(inputs)]
    for args, code, text, proc in launched:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{args}:\n{err[-3000:]}"
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"calm-train {args[0]}: error: ") and text in line, f"{args}: {line}"
    for name in ("zero", "nan", "native", "o"):
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

"""The command line explains itself: --version, help text and defaults on every argument, the named configs in
`train --help`, and `calm-train config` printing the resolved config."""
import argparse

import pytest
import yaml

import calm_train
from calm_train.cli import build_parser, main
from calm_train.config import config_from_tree, load_config, named_configs


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

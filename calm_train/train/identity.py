"""Run identity by content: what a resume, `eval --data` and a CALM run compare (paths never are).

state.json of every checkpoint holds
    "identity": {"model":  sha256[:16] of the model config, paths and runtime choices excluded (NOT_IDENTITY),
                 "tokenizer_sha256": the data's tokenizer (= RUN_DIR/tokenizer's, written once at the first start),
                 "autoencoder": {"weights_sha256", "tokenizer_sha256" (None: not recorded), "path"} or None,
                 "init_from": {"path", "weights_sha256"} or None (warm start)}
One function per part builds it (`model_hash`, `recorded_tokenizer`, `autoencoder_identity`); `check_*` compare
and raise one line naming both hashes, the file each came from and the fix.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import yaml

from calm_train.config import Config, ModelConfig, config_from_tree, to_dict
from calm_train.errors import UserError
from calm_train.train.warm_start import RECORD_FIELDS, init_from_record

# model keys that may change across a resume: where inputs live (the warm-start record included), and how
# attention is computed
NOT_IDENTITY = ("autoencoder", "attention", *RECORD_FIELDS)


class IdentityError(UserError):
    """A launch whose inputs differ from the run's by content."""


def model_hash(model: ModelConfig) -> str:
    tree = {k: v for k, v in to_dict(model).items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def recorded_tokenizer(directory) -> str | None:
    """The tokenizer sha256 that `directory/dataset.json` records (prepared data, a tokenizer/ directory), or None
    (a URL's dataset.json must be there)."""
    from calm_train.data.dataset_info import read_dataset_info
    from calm_train.storage.url import is_url
    if not is_url(directory) and not (pathlib.Path(directory) / "dataset.json").is_file():
        return None
    return read_dataset_info(directory).tokenizer_sha256


def autoencoder_identity(ref) -> dict | None:
    """The frozen autoencoder (train/frozen_autoencoder.AutoencoderRef) by content; the path is only reported."""
    if ref is None:
        return None
    return {"weights_sha256": ref.sha256, "tokenizer_sha256": ref.tokenizer_sha256, "path": str(ref.path)}


def run_identity(cfg: Config, tokenizer_sha256: str, autoencoder_ref=None) -> dict:
    return {"model": model_hash(cfg.model), "tokenizer_sha256": tokenizer_sha256,
            "autoencoder": autoencoder_identity(autoencoder_ref), "init_from": init_from_record(cfg)}


def saved_identity(ckpt: pathlib.Path, state: dict, log) -> dict:
    """state.json's identity; a checkpoint of an older version has none: rebuild what its files tell
    (config.yaml, tokenizer/dataset.json, the autoencoder's weights hash) and say so in one line."""
    if "identity" in state:
        return state["identity"]
    model = config_from_tree(yaml.safe_load((ckpt / "config.yaml").read_text())).model
    old_ae = state.get("autoencoder")
    log(f"{ckpt} has no identity record (an older calm-train wrote it): its model, tokenizer and autoencoder "
        "weights were taken from its config.yaml, tokenizer/ and state.json; the autoencoder's tokenizer is unknown")
    return {"model": model_hash(model), "tokenizer_sha256": recorded_tokenizer(ckpt / "tokenizer"),
            "autoencoder": {"weights_sha256": old_ae["sha256"], "tokenizer_sha256": None, "path": old_ae["path"]}
            if old_ae else None, "init_from": None}


def check_resume(saved: dict, ours: dict, ckpt: pathlib.Path, cfg: Config, data_dir: pathlib.Path) -> None:
    """The relaunch must continue the same model on the same tokenizer against the same autoencoder."""
    state = ckpt / "state.json"
    if saved["model"] != ours["model"]:
        raise IdentityError(
            f"{ckpt} was trained with another model config (model hash {saved['model']} in {state}) than this launch "
            f"asks for (hash {ours['model']}). Fix: use a new run_dir, or restore the model keys of the saved "
            f"{ckpt}/config.yaml")
    if saved["tokenizer_sha256"] not in (None, ours["tokenizer_sha256"]):
        raise IdentityError(
            f"{ckpt} was trained on data with tokenizer sha256 {saved['tokenizer_sha256']} ({state}) but "
            f"data.train has tokenizer sha256 {ours['tokenizer_sha256']} ({data_dir}/dataset.json): the same ids "
            f"would mean other text. Fix: point data.train at data prepared with the run's tokenizer "
            f"({cfg.run_dir}/tokenizer), or use a new run_dir")
    before, now = saved.get("autoencoder"), ours.get("autoencoder")
    if before and now and before["weights_sha256"] != now["weights_sha256"]:
        raise IdentityError(
            f"{ckpt} was trained against the autoencoder with weights sha256 {before['weights_sha256']} "
            f"(then at {before['path']}, recorded in {state}) but model.autoencoder={cfg.model.autoencoder} has "
            f"weights sha256 {now['weights_sha256']} ({now['path']}): it was retrained or replaced. Fix: point "
            "model.autoencoder at the autoencoder this run was trained with, or use a new run_dir")


def check_val_tokenizer(cfg: Config, data_dir: pathlib.Path, tokenizer_sha256: str) -> None:
    """data.val must share data.train's tokenizer (`tokenizer_sha256`, from `data_dir`/dataset.json)."""
    if cfg.data.val:
        val = recorded_tokenizer(cfg.data.val)
        if val not in (None, tokenizer_sha256):
            raise IdentityError(
                f"data.val={cfg.data.val} has tokenizer sha256 {val} ({cfg.data.val}/dataset.json) but data.train "
                f"has {tokenizer_sha256} ({data_dir}/dataset.json). Fix: prepare the validation data with the "
                "training data's tokenizer")


def check_run_tokenizer(run_dir: pathlib.Path, data_dir: pathlib.Path, tokenizer_sha256: str) -> None:
    """RUN_DIR/tokenizer/ is written once, at the first start: later launches must bring data of that tokenizer."""
    theirs = recorded_tokenizer(run_dir / "tokenizer")
    if theirs is not None and theirs != tokenizer_sha256:
        raise IdentityError(
            f"{run_dir}/tokenizer/dataset.json records tokenizer sha256 {theirs} (this run's, written at its first "
            f"start) but data.train has {tokenizer_sha256} ({data_dir}/dataset.json). Fix: "
            f"point data.train at data prepared with {run_dir}/tokenizer, use a new run_dir, or restart with "
            "train.resume_from=scratch (the old run is moved aside)")


def check_autoencoder_tokenizer(ref, data_dir: pathlib.Path, tokenizer_sha256: str, log) -> None:
    """A CALM run's frozen autoencoder must have been trained with the data's tokenizer."""
    if ref.tokenizer_sha256 is None:
        log(f"warning: the autoencoder {ref.path} records no tokenizer (no dataset.json): could not check that it "
            f"was trained with the data's tokenizer (sha256 {tokenizer_sha256})")
    elif ref.tokenizer_sha256 != tokenizer_sha256:
        raise IdentityError(
            f"the autoencoder {ref.path} was trained with tokenizer sha256 {ref.tokenizer_sha256} "
            f"({ref.path}/tokenizer/dataset.json) but data.train has {tokenizer_sha256} ({data_dir}/dataset.json): "
            "its latents would encode other text. Fix: use an autoencoder "
            "trained on data of this tokenizer, or prepare the data with the autoencoder's tokenizer "
            f"({ref.path}/tokenizer)")


def check_eval_data(ckpt: pathlib.Path, data) -> None:
    """`eval`: the data (a directory or a data.train mixture) must be tokenized as the checkpoint's model was."""
    from calm_train.data.mixing import as_sources
    ours = recorded_tokenizer(ckpt / "tokenizer")
    for data_dir in [source.path for source in as_sources(data)]:
        theirs = recorded_tokenizer(data_dir)
        if None not in (ours, theirs) and theirs != ours:
            raise IdentityError(
                f"{data_dir} has tokenizer sha256 {theirs} ({data_dir}/dataset.json) but {ckpt} was trained with "
                f"{ours} ({ckpt}/tokenizer/dataset.json): the same ids would mean other text. Fix: evaluate on data "
                f"prepared with the checkpoint's tokenizer (calm-train prepare --tokenizer {ckpt}/tokenizer/...)")

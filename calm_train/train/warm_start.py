"""`model.init_from=PATH`: a new run that starts from another model's weights (DESIGN.md "Warm start").

PATH is anything convert/sources.py opens: a native run (its latest checkpoint) or checkpoint (or its URL), an
exported Hugging Face Llama directory, a reference-layout CALM or autoencoder directory.  It must hold
a model of the run's kind, architecture and vocabulary: checked before any process group starts, a
mismatch is one line naming the key, both values and the override that fixes it.  Hyperparameters of
the loss (head.num_samples, num_target_samples, beta, the autoencoder's dropout and KL terms) may differ.

Its full tp = pp = 1 state dict becomes the task's `init_state` (each rank copies its TP slice of its
stage's layers), the optimizer starts fresh and the run at step 0.  A CALM source's frozen autoencoder
becomes `model.autoencoder` when that is unset.  The source is recorded as model.init_from (resolved
path) and model.init_from_sha256 in config.yaml and as `identity.init_from` {path, weights_sha256} in
every checkpoint's state.json.  Once the run has a checkpoint of its own, a relaunch resumes from it:
the source is not read again and the record is the one the checkpoint holds.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from calm_train.config import Config, ModelConfig
from calm_train.errors import UserError
from calm_train.storage.url import is_url

KEY = "model.init_from"
RECORD_FIELDS = ("init_from", "init_from_sha256")     # in ModelConfig; never part of the model's identity hash
ARCHITECTURE = {
    "ar": ("vocab_size", "backbone"),
    "calm": ("vocab_size", "patch_size", "backbone", "head.num_blocks", "head.noise_size", "ae.latent_size"),
    "autoencoder": ("vocab_size", "patch_size", "ae.hidden_size", "ae.intermediate_size", "ae.num_encoder_layers",
                    "ae.num_decoder_layers", "ae.latent_size", "ae.norm_eps"),
}


def architecture(model: ModelConfig) -> dict[str, object]:
    """The dotted model keys that fix the weights' shapes and meaning, with their values."""
    out = {}
    for key in ARCHITECTURE[model.kind]:
        node = model
        for part in key.split("."):
            node = getattr(node, part)
        if dataclasses.is_dataclass(node):
            out.update({f"{key}.{f.name}": getattr(node, f.name) for f in dataclasses.fields(node)})
            if key == "backbone":
                out["backbone.num_kv_heads"] = node.kv_heads          # None means num_heads
        else:
            out[key] = node
    return out


def init_from_record(cfg: Config) -> dict | None:
    """identity.init_from of state.json."""
    m = cfg.model
    return {"path": m.init_from, "weights_sha256": m.init_from_sha256} if m.init_from else None


class WarmStart:
    """model.init_from of one launch.  Before process groups: `WarmStart(cfg, run_dir)` fills model.autoencoder
    (CALM) and, unless the run has a checkpoint of its own, opens, checks and reads the source; `settle` takes
    the resume point into account once it is known."""

    def __init__(self, cfg: Config, run_dir: pathlib.Path):
        from calm_train.convert.native import complete_checkpoints
        self.spec, self.source, self.state = cfg.model.init_from, None, None
        if cfg.model.kind == "calm" and not cfg.model.autoencoder:
            cfg.model.autoencoder = self.spec        # the same string on every launch: a stable model config
        if not complete_checkpoints(run_dir / "checkpoints", lambda _: None):
            self.load(cfg)

    @classmethod
    def open(cls, cfg: Config, run_dir: pathlib.Path) -> "WarmStart | None":
        return cls(cfg, run_dir) if cfg.model.init_from else None

    def load(self, cfg: Config) -> None:
        """Open the source, check it against the run (kind, architecture, vocabulary) and read its weights."""
        from calm_train.convert.sources import open_source
        try:
            self.source = open_source(self.spec)
        except UserError as err:
            raise UserError(f"config key '{KEY}': {err}") from err
        kind, theirs = cfg.model.kind, self.source.model.kind
        if theirs != kind:
            raise UserError(f"config key '{KEY}': {self.source.path} holds a model of kind {theirs}, the run trains "
                            f"kind {kind}. Fix: point {KEY} at a {kind} model, or train a {theirs} config")
        self._check_architecture(cfg)
        self._check_tokenizer(cfg)
        self.state, _ = self.source.read()
        sha = self.source.weights_sha256()
        if cfg.model.init_from_sha256 and cfg.model.init_from_sha256 != sha:
            raise UserError(f"config key 'model.init_from_sha256' is {cfg.model.init_from_sha256} but "
                            f"{self.source.weights} has sha256 {sha}. Fix: point {KEY} at the weights you pinned, "
                            "or drop model.init_from_sha256")
        where = self.spec if is_url(self.spec) else str(self.source.path.resolve())    # a URL: its download is a cache
        cfg.model.init_from, cfg.model.init_from_sha256 = where, sha

    def settle(self, cfg: Config, latest: pathlib.Path | None, log) -> None:
        """Once the resume point is known: a resumed run keeps its checkpoint's record and ignores the source;
        a fresh start (e.g. after train.resume_from=scratch) reads the source if it has not yet."""
        if latest is not None:
            saved = json.loads((latest / "state.json").read_text()).get("identity", {}).get("init_from")
            cfg.model.init_from, cfg.model.init_from_sha256 = (saved["path"], saved["weights_sha256"]) if saved \
                else (None, None)
            self.state = None
            log(f"{KEY}={self.spec} is not read: the run resumes from its own checkpoint {latest}")
            return
        if self.source is None:
            self.load(cfg)
        log(f"warm start from {cfg.model.init_from} ({self.source.layout} layout, weights sha256 "
            f"{cfg.model.init_from_sha256[:16]}...): step 0, fresh optimizer")

    def take_state(self) -> dict | None:
        """The full state dict for Task.init_state, handed over once (the engine keeps no copy)."""
        state, self.state = self.state, None
        return state

    def _check_architecture(self, cfg: Config) -> None:
        ours, theirs = architecture(cfg.model), architecture(self.source.model)
        if ours["vocab_size"] != theirs["vocab_size"]:
            raise UserError(f"config key '{KEY}': {self.source.path} has a vocabulary of {theirs['vocab_size']} "
                            f"but the data {cfg.data.train} has {ours['vocab_size']}. Fix: prepare the data with "
                            f"the source's tokenizer, or drop {KEY}")
        differ = [k for k in ours if ours[k] != theirs[k]]
        if differ:
            fix = " ".join(f"model.{k}={theirs[k]}" for k in differ)
            raise UserError(f"config key 'model.{differ[0]}' is {ours[differ[0]]} but {KEY} {self.source.path} has "
                            f"{theirs[differ[0]]} ({len(differ)} architecture key(s) differ). Fix: add {fix} "
                            f"(the source's architecture), or drop {KEY}")

    def _check_tokenizer(self, cfg: Config) -> None:
        from calm_train.data.tokenizer import PROBE, load_dataset_tokenizer
        theirs = self.source.tokenizer()
        if theirs is None:
            raise UserError(f"config key '{KEY}': {self.source.path} holds no tokenizer, so its vocabulary cannot be "
                            f"checked against {cfg.data.train}'s. Fix: put the model's tokenizer.json (and "
                            "tokenizer_config.json) beside its config.json")
        ours = load_dataset_tokenizer(cfg.data.train)
        if theirs.encode(PROBE) != ours.encode(PROBE) or theirs.eos_id != ours.eos_id:
            raise UserError(f"config key '{KEY}': the tokenizer of {self.source.path} differs from the data's "
                            f"({cfg.data.train}): the same text gives other ids. Fix: prepare the data with the "
                            "source's tokenizer (calm-train prepare --tokenizer SOURCE/tokenizer.json)")

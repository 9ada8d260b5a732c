"""Reading and checking weight files of Hugging Face-layout directories.

A directory holds its weights as `model.safetensors`, `pytorch_model.bin`, or shards listed by
`model.safetensors.index.json` / `pytorch_model.bin.index.json`.  `read_weights` loads them all
(cast to float32) and remembers which file each key came from, so a problem names the file.

Aliases: a module registered under two names (the reference autoencoder's tied output layer
`decoder.lm_head_weight` = `encoder.embed_tokens.weight`; its CALM head `generative_head` =
`mlp_generator`; a tied Llama's `lm_head.weight`) is saved under both names by `torch.save`
(one storage) and by copies that clone it, or under one name by safetensors writers that drop
the duplicate.  `resolve_aliases` accepts each alias only when it equals the tensor it names.
"""
from __future__ import annotations

import json
import pathlib
import pickle

import torch

from calm_train.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ConvertError(UserError):
    """A directory that cannot be converted; the message names the file, the key and the fix."""


class Weights(dict):
    """key -> float32 tensor, plus `origin[key]`: the file it was read from; `source`: what was opened."""

    def __init__(self, tensors: dict[str, torch.Tensor], origin: dict[str, pathlib.Path], source: pathlib.Path):
        super().__init__(tensors)
        self.origin, self.source = origin, source

    def where(self, key: str) -> pathlib.Path:
        return self.origin.get(key, self.source)


def find_weights(directory: pathlib.Path) -> pathlib.Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ConvertError(f"{directory} holds no weights (none of {', '.join(WEIGHT_FILES)}). Fix: point at a "
                       "directory written by `calm-train convert --to hf` or a downloaded release")


def _read_one(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"{path} is missing (the weight index names it). Fix: download every shard")
    from safetensors import SafetensorError
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConvertError(f"{path} cannot be read ({str(err).splitlines()[0]}): truncated or damaged. Fix: "
                           "download it again") from err
    if not isinstance(state, dict):
        raise ConvertError(f"{path} does not hold a state dict (found {type(state).__name__}). Fix: save "
                           "`model.state_dict()` with torch.save")
    return state


def weight_names(path: pathlib.Path) -> list[str]:
    """The tensor names of a weight file or an index of shards, from the headers only (a .bin is unpickled:
    it has no header)."""
    path = pathlib.Path(path)
    if path.name.endswith(".index.json"):
        try:
            return list(json.loads(path.read_text())["weight_map"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConvertError(f"{path} is not a weight index with a weight_map ({err}). Fix: download it "
                               "again") from err
    if path.suffix != ".safetensors":
        return list(_read_one(path))
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ConvertError(f"{path} cannot be read ({str(err).splitlines()[0]}): truncated or damaged. Fix: "
                           "download it again") from err


def read_weights(path: pathlib.Path) -> Weights:
    """All tensors of a weight file or an index of shards, as float32."""
    path = pathlib.Path(path)
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        files = {f: path.parent / f for f in sorted(set(weight_map.values()))}
    else:
        files = {path.name: path}
    tensors, origin = {}, {}
    for file in files.values():
        for key, value in _read_one(file).items():
            tensors[key] = value.float() if value.is_floating_point() else value
            origin[key] = file
    return Weights(tensors, origin, path)


def resolve_aliases(weights: Weights, aliases: dict[str, str]) -> Weights:
    """Drop each `alias` key present after checking it equals its `target` (an alias without its target is
    renamed to it); a differing alias is an error naming both keys."""
    for alias, target in aliases.items():
        if alias not in weights:
            continue
        tensor, origin = weights.pop(alias), weights.origin.pop(alias, weights.source)
        if target not in weights:
            weights[target], weights.origin[target] = tensor, origin
        elif weights[target].shape != tensor.shape or not torch.equal(weights[target], tensor):
            diff = ("shape " + str(list(tensor.shape)) if weights[target].shape != tensor.shape else
                    f"max |difference| {(weights[target] - tensor).abs().max().item():.3g}")
            raise ConvertError(f"{origin}: '{alias}' differs from '{target}' ({diff}), but the model ties them (one "
                               f"tensor under two names). Fix: save both names from the same tensor, or delete "
                               f"'{alias}' to use '{target}'")
    return weights


def check_shapes(weights: Weights, expected: dict[str, tuple[int, ...]], fix: str) -> None:
    """Every expected key present with its shape, nothing unexpected; errors name the key and the file."""
    for key, shape in expected.items():
        if key not in weights:
            raise ConvertError(f"{weights.source}: key '{key}' is missing (expected shape {list(shape)}). Fix: {fix}")
        if tuple(weights[key].shape) != tuple(shape):
            raise ConvertError(f"{weights.where(key)}: key '{key}' has shape {list(weights[key].shape)}, the "
                               f"config says {list(shape)}. Fix: {fix}")
    unexpected = sorted(k for k in weights if k not in expected)
    if unexpected:
        raise ConvertError(f"{weights.where(unexpected[0])}: unexpected keys {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all). Fix: {fix}")


def save_weights(state: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    """One safetensors file with the metadata `transformers` expects."""
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})

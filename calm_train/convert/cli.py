"""`calm-train convert SRC DST --to hf|native [--tp N --pp N]`.

--to hf      SRC: a run directory (its latest checkpoint) or a checkpoint directory.
             AR -> a `LlamaForCausalLM` directory (config.json, generation_config.json,
             model.safetensors; tie_word_embeddings when the output layer equals the embedding);
             CALM and autoencoder -> the CALM paper's reference release layout (`reference.py`):
               DST/config.json, model.safetensors         the CALM (ae_path = DST/autoencoder, absolute)
               DST/autoencoder/config.json, model.safetensors   its frozen autoencoder
             The tokenizer is written beside (and into DST/autoencoder), loadable with
             `AutoTokenizer.from_pretrained(DST)`.  Files are written 0644, directories 0755.
--to native  SRC: such a directory (ours, the reference release's, or any Llama checkpoint in
             safetensors or pytorch_model.bin, sharded or not).  DST becomes a checkpoint
             directory (config.yaml, tokenizer/, model.safetensors, for CALM also
             autoencoder.safetensors + autoencoder.yaml, manifest.json last) that `eval`,
             `generate` and `convert --to hf` accept.

`--tp/--pp` (only with --to native) are recorded as the layout to train the checkpoint with
(config.yaml's parallel.tp/pp and the manifest) and checked against the model's sizes.  They do
not shard anything: model.safetensors holds the full, layout-free fp32 state dict, and a run
splits it over its own TP x PP ranks when it loads it.

Every weight is float32; no weight changes value, only names and the QKV / gate-up fusion.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

from calm_train.config import Config, DataConfig, ParallelConfig, to_yaml, validate
from calm_train.convert import hf_llama, reference
from calm_train.convert.native import save_autoencoder_file, write_manifest
from calm_train.convert.sources import open_source
from calm_train.convert.tokenizer_io import export_tokenizer, import_tokenizer
from calm_train.convert.weights import ConvertError, save_weights


@contextlib.contextmanager
def _staged(dst: pathlib.Path):
    """Write into DST's sibling `.partial-NAME` and rename it to DST at the end: DST is complete or absent."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"{dst} exists and is not empty. Fix: choose a new destination directory")
    partial = dst.parent / f".partial-{dst.name}"
    if partial.exists():
        shutil.rmtree(partial)                  # our own leftover of an interrupted conversion
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for path in [partial, *partial.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)       # readable by others whatever the umask
    if dst.exists():
        dst.rmdir()
    os.replace(partial, dst)


# ---------------------------------------------------------------------------------------------
# native -> Hugging Face


def _hf_directories(source, dst: pathlib.Path, seq_len: int) -> dict[str, tuple[dict, dict]]:
    """{directory relative to DST: (weights, config.json fields)} of the export."""
    m = source.model
    native, ae = source.read()
    if m.kind == "ar":
        tied = hf_llama.is_tied(native)
        return {".": (hf_llama.ar_to_hf(native, m.backbone, tied),
                      hf_llama.llama_config(m.backbone, m.vocab_size, seq_len, tied))}
    if m.kind == "autoencoder":
        return {".": (reference.autoencoder_to_reference(native),
                      reference.autoencoder_fields(m.ae, m.vocab_size, m.patch_size))}
    ae_fields = reference.autoencoder_fields(ae.arch, ae.vocab_size, ae.patch_size)
    calm = {**reference.calm_fields(m, ae.vocab_size), "max_position_embeddings": seq_len // m.patch_size,
            "ae_path": str(dst.resolve() / reference.AUTOENCODER_DIR)}
    return {".": (reference.calm_to_reference(native, ae.state_dict(), m), calm),
            reference.AUTOENCODER_DIR: (reference.autoencoder_to_reference(ae.state_dict()), ae_fields)}


def export_hf(src, dst) -> pathlib.Path:
    from calm_train.data.dataset_info import read_dataset_info
    source = open_source(src)
    if source.layout != "native":
        raise ConvertError(f"{src} is already a Hugging Face-layout directory ({source.layout}). Fix: export a run "
                           "or checkpoint directory, or import this one with --to native")
    seq_len = read_dataset_info(source.path / "tokenizer").seq_len
    dst = pathlib.Path(dst)
    try:
        directories = _hf_directories(source, dst, seq_len)
    except KeyError as err:
        raise ConvertError(f"{source.weights}: key {err} is missing for a {source.model.kind} model of "
                           f"{source.path}/config.yaml. Fix: use the config the checkpoint was saved with") from err
    with _staged(dst) as out:
        special = export_tokenizer(source.path / "tokenizer", out, seq_len)
        tokenizer_files = [p for p in out.iterdir() if p.is_file()]
        for name, (weights, config) in directories.items():
            directory = out / name
            directory.mkdir(exist_ok=True)
            for path in tokenizer_files if name != "." else ():
                shutil.copy(path, directory / path.name)
            save_weights(weights, directory / "model.safetensors")
            (directory / "config.json").write_text(json.dumps({**config, **special, "seq_len": seq_len}, indent=1)
                                                   + "\n")
        if source.model.kind == "ar":
            from transformers import GenerationConfig
            GenerationConfig(**special).save_pretrained(out)
    return dst


# ---------------------------------------------------------------------------------------------
# Hugging Face -> native


def import_native(src, dst, tp: int = 1, pp: int = 1) -> pathlib.Path:
    from safetensors.torch import save_file
    source = open_source(src)
    if source.layout == "native":
        raise ConvertError(f"{source.path} is already a native checkpoint. Fix: use it as it is (a run splits it "
                           "over its own layout when it loads it), or export it with --to hf")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    model, seq_len = source.model, source.config.data.seq_len
    native, autoencoder = source.read()
    cfg = Config(run_dir=f"runs/{dst.name}", model=model, parallel=ParallelConfig(tp=tp, pp=pp),
                 data=DataConfig(seq_len=seq_len))
    validate(cfg)
    with _staged(dst) as out:
        import_tokenizer(src, out / "tokenizer", model.vocab_size, model.patch_size, seq_len)
        (out / "config.yaml").write_text(to_yaml(cfg))
        save_file({k: v.float().contiguous() for k, v in native.items()}, str(out / "model.safetensors"))
        if autoencoder is not None:
            save_autoencoder_file(autoencoder, out)
        write_manifest(out, 0, {"kind": model.kind, "converted_from": str(src), "layout": {"tp": tp, "pp": pp}})
    return dst


def run_convert(src, dst, to: str, tp: int = 1, pp: int = 1) -> int:
    """The `convert` command; returns the exit status (UserErrors propagate to the CLI)."""
    from calm_train.storage.url import local_only
    local_only(dst, "DST", "write DST to a local directory (SRC may be a URL)")
    if to == "hf":
        if (tp, pp) != (1, 1):
            raise ConvertError(f"--tp {tp} --pp {pp} with --to hf: an exported directory has no parallel layout. "
                               "Fix: drop --tp/--pp (they record the layout for --to native)")
        out = export_hf(src, dst)
    elif to == "native":
        out = import_native(src, dst, tp, pp)
    else:
        raise ConvertError(f"--to {to!r} is unknown. Fix: use --to hf or --to native")
    print(f"converted {src} -> {out} ({'Hugging Face layout' if to == 'hf' else 'native checkpoint'})")
    return 0


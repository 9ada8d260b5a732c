"""Tiny native checkpoints built directly (models + files, no training run) and their tokenizers."""
import base64
import json
import pathlib

import pytest
import torch
import yaml

from calm_train.config import AutoencoderArch, BackboneArch, Config, DataConfig, EnergyHeadArch, ModelConfig, to_yaml
from calm_train.data.dataset_info import DatasetInfo, write_dataset_info
from calm_train.data.tokenizer import GPT2_PAT, load_tokenizer
from calm_train.train.checkpoint import CheckpointManager

SEQ_LEN = 16
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "A continuous autoregressive language model "
          "predicts the next vector, not the next token.", "Energy scores compare samples; Brier scores compare "
          "guesses. 12345 numbers and more words, words, words."] * 20
SPECIALS = ["<|endoftext|>", "<|pad|>"]


@pytest.fixture(scope="session")
def bpe_tokenizer_file(tmp_path_factory) -> pathlib.Path:
    """A plain byte-level BPE tokenizer.json (the kind `prepare --tokenizer train:VOCAB` writes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320 - len(SPECIALS), show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIALS)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    path.write_text(tok.to_str())
    return path


@pytest.fixture(scope="session")
def tiktoken_file(bpe_tokenizer_file, tmp_path_factory) -> pathlib.Path:
    """The same BPE as a tiktoken file (`base64(token) rank` lines) + tokenizer_config.json with its specials."""
    from calm_train.data.tokenizer import _bytes_to_unicode
    spec = json.loads(bpe_tokenizer_file.read_text())
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = sorted((rank, bytes(to_byte[c] for c in token)) for token, rank in spec["model"]["vocab"].items())
    directory = tmp_path_factory.mktemp("tiktoken")
    (directory / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in ranks))
    specials = {str(len(ranks) + i): {"content": s, "special": True} for i, s in enumerate(SPECIALS)}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": specials, "eos_token": SPECIALS[0], "pad_token": SPECIALS[1], "pat_str": GPT2_PAT}))
    return directory / "tokenizer.model"


def tiny_model_config(kind: str, vocab_size: int) -> ModelConfig:
    return ModelConfig(kind=kind, vocab_size=vocab_size, patch_size=4, attention="sdpa", init_std=0.2,
                       ae=AutoencoderArch(hidden_size=32, intermediate_size=48, latent_size=8, ae_dropout=0.15),
                       backbone=BackboneArch(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                             num_kv_heads=2, rope_theta=500.0, norm_eps=1e-5),
                       head=EnergyHeadArch(num_blocks=2, noise_size=8, num_samples=4, num_target_samples=6))


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its structured init (unit norms, zero biases, zero last layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def native_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def write_checkpoint(run_dir: pathlib.Path, model_cfg: ModelConfig, model, tokenizer_file: pathlib.Path,
                     autoencoder=None) -> pathlib.Path:
    """A complete native checkpoint through the checkpoint manager: what a run saves (without engine/ and rng/)."""
    from safetensors.torch import save_file
    from calm_train.convert.native import save_autoencoder_file
    tok = load_tokenizer(tokenizer_file)
    if model_cfg.kind == "calm":
        model_cfg.autoencoder = "unused-by-convert"
    cfg = Config(run_dir=str(run_dir), model=model_cfg, data=DataConfig(seq_len=SEQ_LEN))

    def write(directory: pathlib.Path) -> None:
        (directory / "config.yaml").write_text(to_yaml(cfg))
        save_file(native_state(model), str(directory / "model.safetensors"))
        tok.save(directory / "tokenizer")
        write_dataset_info(directory / "tokenizer", DatasetInfo(
            vocab_size=model_cfg.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id,
            patch_size=model_cfg.patch_size, seq_len=SEQ_LEN, tokenizer=tok.main, tokenizer_sha256=tok.sha256,
            tokenizer_files=sorted(tok.files), splits={}, documents=0, text_bytes=0, samples_per_shard=0,
            val_fraction=0.0))
        if autoencoder is not None:
            save_autoencoder_file(autoencoder, directory)

    return CheckpointManager(run_dir, log=lambda *_: None).save(3, write, {"kind": model_cfg.kind})


def saved_config(ckpt: pathlib.Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())

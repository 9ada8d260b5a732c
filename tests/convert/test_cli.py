"""`convert` end to end: exit codes, `generate` on a converted checkpoint, the frozen-AE loader on exports."""
import torch

from calm_train.cli import main
from calm_train.config import Config
from calm_train.models.ar import ARModel
from calm_train.models.autoencoder import Autoencoder
from calm_train.parallel import runtime
from calm_train.train.frozen_autoencoder import check_autoencoder, load_frozen_autoencoder
from calm_train.train.inference import generate_text

from .conftest import native_state, perturb_, tiny_model_config, write_checkpoint


def test_cli_round_trip_generates_the_same_text(bpe_tokenizer_file, tmp_path, capsys):
    from calm_train.data.tokenizer import load_tokenizer
    vocab = load_tokenizer(bpe_tokenizer_file).vocab_size
    with runtime.single_process(seed=0):
        model = ARModel(tiny_model_config("ar", vocab))
        write_checkpoint(tmp_path / "run", tiny_model_config("ar", vocab), model, bpe_tokenizer_file)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "native", "--tp", "2"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "native"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    original = generate_text(str(tmp_path / "run"), "The quick brown", temperature=0.0, max_new_tokens=12)
    assert generate_text(str(tmp_path / "back"), "The quick brown", temperature=0.0, max_new_tokens=12) == original
    assert len(original) > 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}      # an exported directory, read in memory
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "The quick brown", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == original + "\n"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_frozen_autoencoder_loader_reads_exported_directories(bpe_tokenizer_file, tmp_path):
    from calm_train.data.tokenizer import load_tokenizer
    vocab = load_tokenizer(bpe_tokenizer_file).vocab_size
    cfg = tiny_model_config("autoencoder", vocab)
    ae = perturb_(Autoencoder(cfg.ae, vocab, cfg.patch_size), seed=4)
    write_checkpoint(tmp_path / "ae_run", cfg, ae, bpe_tokenizer_file)
    assert main(["convert", str(tmp_path / "ae_run"), str(tmp_path / "ae_hf"), "--to", "hf"]) == 0

    calm_cfg = Config(model=tiny_model_config("calm", vocab))
    calm_cfg.model.autoencoder = str(tmp_path / "ae_hf")
    calm_cfg.model.ae.hidden_size = 16                        # taken from the autoencoder, not the CALM config
    ref = check_autoencoder(calm_cfg)
    assert ref.layout == "hf" and calm_cfg.model.ae.hidden_size == 32
    frozen = load_frozen_autoencoder(ref, torch.device("cpu"))
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in native_state(ae).items())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_frozen_autoencoder_loader_reads_a_calm_checkpoints_autoencoder(bpe_tokenizer_file, tmp_path):
    """What model.autoencoder becomes when a CALM run warm-starts from a native CALM run."""
    from calm_train.data.tokenizer import load_tokenizer
    from calm_train.models.calm import CALM
    vocab = load_tokenizer(bpe_tokenizer_file).vocab_size
    cfg = tiny_model_config("calm", vocab)
    ae = perturb_(Autoencoder(cfg.ae, vocab, cfg.patch_size), seed=5)
    with runtime.single_process(seed=0):
        write_checkpoint(tmp_path / "calm_run", cfg, CALM(cfg), bpe_tokenizer_file, autoencoder=ae)
    calm_cfg = Config(model=tiny_model_config("calm", vocab))
    calm_cfg.model.autoencoder = str(tmp_path / "calm_run")
    ref = check_autoencoder(calm_cfg)
    assert ref.weights.name == "autoencoder.safetensors" and ref.layout == "native"
    frozen = load_frozen_autoencoder(ref, torch.device("cpu"))
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in native_state(ae).items())

"""CALM and autoencoder <-> the reference release layout.

Files laid out as the release's scripts write them (reference_layout.py: a .bin whose aliases share one
storage, safetensors with the aliases cloned or dropped, shards) import and give the outputs recorded
from an independent forward with the reference semantics; an alias that differs from its target is
refused; our export loads the way the reference loads it (strict: ae_path from any working directory,
every key); our own checkpoints round-trip exactly; bad input names the key and the file."""
import json

import pytest
import torch

from calm_train.config import Config
from calm_train.convert.cli import run_convert
from calm_train.convert.reference import load_reference_autoencoder_weights, read_reference_autoencoder_config
from calm_train.convert.weights import ConvertError
from calm_train.data.tokenizer import load_tokenizer
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.calm import CALM
from calm_train.models.generate import generate_calm
from calm_train.models.rng import SampleRNG
from calm_train.parallel import runtime
from calm_train.convert.native import verify_checkpoint
from calm_train.train.frozen_autoencoder import check_autoencoder, load_frozen_autoencoder
from calm_train.train.inference import load_for_inference

from . import reference_layout as ref
from .conftest import native_state, perturb_, tiny_model_config, write_checkpoint

CPU = torch.device("cpu")
SIZES = ref.Sizes()                              # the sizes of tiny_model_config
K, NOISE = SIZES.patch, SIZES.noise
ATOL = 1e-5


@pytest.fixture(scope="module")
def world():
    with runtime.single_process(seed=0) as w:
        yield w


@pytest.fixture(scope="module")
def vocab(bpe_tokenizer_file):
    return load_tokenizer(bpe_tokenizer_file).vocab_size


def tokens_BL(vocab_size, batch=2, length=16, seed=3):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def rng(batch=2):
    return SampleRNG(torch.arange(batch) + 7)


def head_noise():
    return torch.rand(2, 4, 3, NOISE, generator=torch.Generator().manual_seed(4)) - 0.5


@pytest.fixture(scope="module")
def release(vocab, bpe_tokenizer_file, tmp_path_factory):
    """A CALM release and its autoencoder's release in every variant, and the outputs recorded from the
    independent forward: {"calm": state, "ae": state, "recorded": {...}, "calm_dirs", "ae_dirs"}."""
    calm = ref.calm_state(SIZES, vocab, torch.Generator().manual_seed(11))
    ae = ref.strip(calm, "ae_model.")                 # the autoencoder's own release: the same tensors
    root = tmp_path_factory.mktemp("release")
    ae_dirs = {v: ref.write_release(root / f"ae_{v}", ref.autoencoder_config(SIZES, vocab), ae, bpe_tokenizer_file, v)
               for v in ref.VARIANTS}
    calm_dirs = {v: ref.write_release(root / f"calm_{v}", ref.calm_config(SIZES, vocab, str(ae_dirs["bin"])), calm,
                                      bpe_tokenizer_file, v) for v in ref.VARIANTS}
    tokens = tokens_BL(vocab)
    mean, log_std = ref.ae_encode(ae, SIZES, tokens.view(2, 4, K))
    hidden = ref.calm_hidden(calm, SIZES, vocab, tokens)
    recorded = {"hidden": hidden, "mean": mean, "log_std": log_std, "logits": ref.ae_decode_logits(ae, SIZES, mean),
                "head": ref.head_sample(ref.strip(calm, "mlp_generator."), hidden, head_noise()),
                "loss": ref.calm_loss(calm, SIZES, vocab, tokens, rng(), num_samples=8, num_target_samples=100)}
    return {"calm": calm, "ae": ae, "recorded": recorded, "calm_dirs": calm_dirs, "ae_dirs": ae_dirs}


def assert_close(got, expected, atol=ATOL):
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= atol, (got - expected).abs().max().item()


# ---------------------------------------------------------------------------------------------
# the reference's own files


def test_fixture_is_laid_out_as_the_reference_saves(release):
    binary = torch.load(release["calm_dirs"]["bin"] / "pytorch_model.bin", weights_only=True)
    assert {k.split(".")[0] for k in binary} == {"transformer", "embed_proj", "mlp_generator", "generative_head",
                                                 "ae_model"}
    assert binary["ae_model.decoder.lm_head_weight"].data_ptr() == binary["ae_model.encoder.embed_tokens.weight"].data_ptr()
    assert binary["generative_head.noise_embd.weight"].data_ptr() == binary["mlp_generator.noise_embd.weight"].data_ptr()
    config = json.loads((release["calm_dirs"]["bin"] / "config.json").read_text())
    assert "model_type" not in config and config["ae_path"] and config["architectures"] == ["EnergyTransformer"]


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_reference_calm_files_import_and_give_the_recorded_outputs(world, release, variant):
    loaded = load_for_inference(str(release["calm_dirs"][variant]), CPU)       # read in memory
    r, tokens = release["recorded"], tokens_BL(loaded.cfg.model.vocab_size)
    spec = loaded.cfg.model.head
    assert (spec.num_samples, spec.num_target_samples) == (8, 100)      # N from the config, M: our default
    with torch.no_grad():
        assert_close(loaded.model.hidden(tokens), r["hidden"])
        mean, log_std = loaded.autoencoder.encode(tokens.view(2, 4, K))
        assert_close(mean, r["mean"])
        assert_close(log_std, r["log_std"])
        assert_close(loaded.autoencoder.decode_logits(r["mean"]), r["logits"])
        assert_close(loaded.model.generative_head(r["hidden"], head_noise()), r["head"])
        loss = loaded.model(tokens, rng(), loaded.autoencoder)
    assert loss.item() == pytest.approx(r["loss"].item(), rel=1e-5) and loss.item() > 0.05


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_reference_autoencoder_files_import_and_give_the_recorded_outputs(world, release, variant):
    ae = load_for_inference(str(release["ae_dirs"][variant]), CPU).model
    r, tokens = release["recorded"], tokens_BL(ae.vocab_size)
    with torch.no_grad():
        mean, log_std = ae.encode(tokens.view(2, 4, K))
        assert_close(mean, r["mean"])
        assert_close(log_std, r["log_std"])
        assert_close(ae.decode_logits(r["mean"]), r["logits"])


def test_reference_files_convert_to_native_checkpoints(world, release, tmp_path):
    run_convert(release["calm_dirs"]["bin"], tmp_path / "calm", to="native")
    run_convert(release["ae_dirs"]["bin"], tmp_path / "ae", to="native")
    calm = load_for_inference(str(tmp_path / "calm"), CPU)
    assert verify_checkpoint(tmp_path / "calm")["kind"] == "calm"
    in_memory = load_for_inference(str(release["calm_dirs"]["bin"]), CPU)
    for key, value in native_state(in_memory.model).items():
        assert torch.equal(native_state(calm.model)[key], value), key
    assert all(torch.equal(v, release["ae"][k]) for k, v in calm.autoencoder.state_dict().items())
    ae = load_for_inference(str(tmp_path / "ae"), CPU).model
    assert all(torch.equal(v, release["ae"][k]) for k, v in ae.state_dict().items())


def test_frozen_autoencoder_loader_reads_the_reference_files(world, release, vocab):
    for directory in (release["ae_dirs"]["bin"], release["calm_dirs"]["safetensors_without_aliases"]):
        arch, vocab_size, patch_size, _ = read_reference_autoencoder_config(directory)
        assert (arch.hidden_size, arch.latent_size, vocab_size, patch_size) == (SIZES.ae_hidden, SIZES.latent, vocab, K)
        cfg = Config(model=tiny_model_config("calm", vocab))
        cfg.model.autoencoder = str(directory)
        frozen = load_frozen_autoencoder(check_autoencoder(cfg), CPU)
        assert all(torch.equal(v, release["ae"][k]) for k, v in frozen.state_dict().items())


@pytest.mark.parametrize("alias,target", [
    ("ae_model.decoder.lm_head_weight", "ae_model.encoder.embed_tokens.weight"),
    ("generative_head.mlp_blocks.1.down_proj.bias", "mlp_generator.mlp_blocks.1.down_proj.bias")])
def test_an_alias_that_differs_from_its_target_is_refused_naming_both_keys(release, bpe_tokenizer_file, tmp_path,
                                                                          alias, target):
    state = {k: v.clone() for k, v in release["calm"].items()}
    state[alias] += 1e-3
    config = json.loads((release["calm_dirs"]["bin"] / "config.json").read_text())
    src = ref.write_release(tmp_path / "ref", config, state, bpe_tokenizer_file, "safetensors_cloned")
    with pytest.raises(ConvertError, match=f"'{alias}' differs from '{target}'.*Fix:"):
        run_convert(src, tmp_path / "out", to="native")
    assert not (tmp_path / "out").exists()


def test_an_autoencoder_whose_tied_alias_differs_is_refused(release, bpe_tokenizer_file, tmp_path):
    state = {k: v.clone() for k, v in release["ae"].items()}
    state["decoder.lm_head_weight"][0, 0] += 1.0
    config = json.loads((release["ae_dirs"]["bin"] / "config.json").read_text())
    src = ref.write_release(tmp_path / "ae", config, state, bpe_tokenizer_file, "bin")
    with pytest.raises(ConvertError, match=r"'decoder.lm_head_weight' differs from 'encoder.embed_tokens.weight'"):
        load_reference_autoencoder_weights(src / "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# our exports, read as the reference reads them, and exact round trips


@pytest.fixture(scope="module")
def calm_export(world, vocab, bpe_tokenizer_file, tmp_path_factory):
    """(CALM, autoencoder, exported directory) of a perturbed tiny CALM checkpoint."""
    cfg = tiny_model_config("calm", vocab)
    model = perturb_(CALM(cfg), seed=2).eval()
    ae = perturb_(Autoencoder(cfg.ae, vocab, K), seed=3).eval()
    root = tmp_path_factory.mktemp("calm_export")
    write_checkpoint(root / "run", cfg, model, bpe_tokenizer_file, autoencoder=ae)
    run_convert(root / "run", root / "hf", to="hf")
    return model, ae, root / "hf"


def test_calm_export_loads_the_way_the_reference_loads(calm_export, tmp_path, monkeypatch):
    model, ae, exported = calm_export
    monkeypatch.chdir(tmp_path)                                   # ae_path does not depend on the working directory
    config, weights, ae_weights = ref.load_like_reference(exported)
    assert config["ae_path"] == str(exported.resolve() / "autoencoder") and "model_type" not in config
    tokens = tokens_BL(model.model_cfg.vocab_size)
    with torch.no_grad():
        assert_close(ref.calm_hidden(weights, SIZES, model.model_cfg.vocab_size, tokens), model.hidden(tokens))
        mean, _ = ae.encode(tokens.view(2, 4, K))
        for w in (ref.strip(weights, "ae_model."), ae_weights):          # decodes with its own lm_head_weight
            assert_close(ref.ae_decode_logits(w, SIZES, mean), ae.decode_logits(mean))
        hidden = model.hidden(tokens)
        assert_close(ref.head_sample(ref.strip(weights, "generative_head."), hidden, head_noise()),
                     model.generative_head(hidden, head_noise()))


def test_the_strict_loader_refuses_a_missing_ae_path_or_alias(calm_export, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    _, _, exported = calm_export
    no_path = shutil.copytree(exported, tmp_path / "no_ae_path")
    config = json.loads((no_path / "config.json").read_text())
    del config["ae_path"]
    (no_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ref.ReferenceLoadError, match="no ae_path"):
        ref.load_like_reference(no_path)
    no_alias = shutil.copytree(exported, tmp_path / "no_alias")
    weights = load_file(str(no_alias / "model.safetensors"))
    del weights["ae_model.decoder.lm_head_weight"]
    save_file(weights, str(no_alias / "model.safetensors"))
    config = json.loads((no_alias / "config.json").read_text())
    config["ae_path"] = str(no_alias / "autoencoder")
    (no_alias / "config.json").write_text(json.dumps(config))
    with pytest.raises(ref.ReferenceLoadError, match=r"missing keys \['ae_model.decoder.lm_head_weight'\]"):
        ref.load_like_reference(no_alias)


def test_calm_round_trip_is_exact(calm_export, tmp_path):
    model, ae, exported = calm_export
    run_convert(exported, tmp_path / "native", to="native")
    loaded = load_for_inference(str(tmp_path / "native"), CPU)
    tokens = tokens_BL(model.model_cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(tokens, rng(), ae), loaded.model(tokens, rng(), loaded.autoencoder))
    prompt = loaded.tokenizer.encode("The quick brown fox")
    ours = generate_calm(model, ae, prompt, 12, 0.0, seed=5, pad_id=0, num_samples=8)
    assert generate_calm(loaded.model, loaded.autoencoder, prompt, 12, 0.0, seed=5, pad_id=0, num_samples=8) == ours


def test_autoencoder_round_trip_is_exact(world, vocab, bpe_tokenizer_file, tmp_path):
    cfg = tiny_model_config("autoencoder", vocab)
    ae = perturb_(Autoencoder(cfg.ae, vocab, K), seed=1)
    write_checkpoint(tmp_path / "run", cfg, ae, bpe_tokenizer_file)
    run_convert(tmp_path / "run", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in ("patch_size", "latent_size", "num_encoder_layers", "vocab_size")} == \
        {"patch_size": 4, "latent_size": 8, "num_encoder_layers": 2, "vocab_size": vocab}
    assert set(ref.load_checked(tmp_path / "hf", ref.expected_autoencoder_keys(config))) >= {"decoder.lm_head_weight"}
    run_convert(tmp_path / "hf", tmp_path / "native", to="native")
    back = load_for_inference(str(tmp_path / "native"), CPU).model
    assert native_state(back).keys() == native_state(ae).keys()
    tokens = tokens_BL(vocab)
    ae.train(), back.train()                                      # masking and latent dropout active
    assert torch.equal(ae(tokens, rng()).loss, back(tokens, rng()).loss)
    mean, _ = ae.encode(tokens.view(2, 4, K))
    assert torch.equal(ae.decode(mean), back.decode(mean))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("variant", ["safetensors_cloned", "sharded"])
def test_missing_key_or_wrong_shape_names_the_key_and_the_file(release, bpe_tokenizer_file, tmp_path, variant):
    good, config = release["calm"], json.loads((release["calm_dirs"]["bin"] / "config.json").read_text())
    missing = {k: v for k, v in good.items() if k != "transformer.layers.1.mlp.up_proj.weight"}
    src = ref.write_release(tmp_path / "missing", config, missing, bpe_tokenizer_file, variant)
    with pytest.raises(ConvertError) as err:
        run_convert(src, tmp_path / "out1", to="native")
    weights_file = "model.safetensors.index.json" if variant == "sharded" else "model.safetensors"
    assert "'transformer.layers.1.mlp.up_proj.weight' is missing" in str(err.value)
    assert str(src / weights_file) in str(err.value)

    bad = {**good, **{p + "noise_embd.weight": good["mlp_generator.noise_embd.weight"].T.contiguous()
                      for p in ("mlp_generator.", "generative_head.")}}
    src = ref.write_release(tmp_path / "shape", config, bad, bpe_tokenizer_file, variant)
    with pytest.raises(ConvertError) as err:
        run_convert(src, tmp_path / "out2", to="native")
    message = str(err.value)
    assert "'mlp_generator.noise_embd.weight' has shape [8, 32], the config says [32, 8]" in message
    shard = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][
        "mlp_generator.noise_embd.weight"] if variant == "sharded" else "model.safetensors"
    assert str(src / shard) in message
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_missing_config_field_names_the_field_and_the_file(release, bpe_tokenizer_file, tmp_path):
    config = {k: v for k, v in json.loads((release["ae_dirs"]["bin"] / "config.json").read_text()).items()
              if k != "latent_size"}
    src = ref.write_release(tmp_path / "ae", config, release["ae"], bpe_tokenizer_file)
    with pytest.raises(ConvertError, match=r"ae/config.json: key 'latent_size' is missing"):
        run_convert(src, tmp_path / "out", to="native")


def test_failed_conversion_leaves_no_destination(release, bpe_tokenizer_file, tmp_path):
    config = json.loads((release["ae_dirs"]["bin"] / "config.json").read_text())
    src = ref.write_release(tmp_path / "ae", config, release["ae"], bpe_tokenizer_file)
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConvertError, match=r"ae holds no tokenizer.json or tokenizer.model"):
        run_convert(src, tmp_path / "out", to="native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_a_head_with_the_hidden_embedding_in_its_stream_is_not_exported_to_the_reference_layout():
    """The reference head starts its stream with the noise embedding alone: the same weights would run as
    another model there, so the export is refused (the weights carry no trace of the option)."""
    from calm_train.convert.reference import calm_fields
    model = tiny_model_config("calm", 64)
    model.head.hidden_in_stream = True
    with pytest.raises(ConvertError, match="hidden_in_stream"):
        calm_fields(model, model.vocab_size)
    model.head.hidden_in_stream = False
    assert calm_fields(model, model.vocab_size)["noise_size"] == model.head.noise_size

"""CALM and autoencoder <-> the reference release layout: exact round trips, a reference-named random checkpoint
checked against an independent forward (transformers' Llama for the backbone), and errors naming key and file."""
import json
import shutil

import pytest
import torch

from calm_train.convert.cli import run_convert
from calm_train.convert.reference import load_reference_autoencoder_weights, read_reference_autoencoder_config
from calm_train.convert.weights import ConvertError
from calm_train.data.tokenizer import load_tokenizer
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.calm import CALM
from calm_train.models.energy import EnergyHead, energy_score
from calm_train.models.generate import generate_calm
from calm_train.models.rng import SampleRNG
from calm_train.parallel import runtime
from calm_train.convert.native import verify_checkpoint
from calm_train.train.inference import load_for_inference

from .conftest import native_state, perturb_, tiny_model_config, write_checkpoint

CPU = torch.device("cpu")
H, I, LATENT, NOISE, K = 32, 48, 8, 8, 4      # the sizes of tiny_model_config


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


# ---------------------------------------------------------------------------------------------
# round trips of our own checkpoints


def test_autoencoder_round_trip_is_exact(world, vocab, bpe_tokenizer_file, tmp_path):
    cfg = tiny_model_config("autoencoder", vocab)
    ae = perturb_(Autoencoder(cfg.ae, vocab, K), seed=1)
    ckpt = write_checkpoint(tmp_path / "run", cfg, ae, bpe_tokenizer_file)
    run_convert(tmp_path / "run", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in ("patch_size", "latent_size", "num_encoder_layers", "vocab_size")} == \
        {"patch_size": 4, "latent_size": 8, "num_encoder_layers": 2, "vocab_size": vocab}
    run_convert(tmp_path / "hf", tmp_path / "native", to="native")
    back = load_for_inference(str(tmp_path / "native"), CPU).model
    assert native_state(back).keys() == native_state(ae).keys()
    tokens = tokens_BL(vocab)
    ae.train(), back.train()                                      # masking and latent dropout active
    assert torch.equal(ae(tokens, rng()).loss, back(tokens, rng()).loss)
    mean, _ = ae.encode(tokens.view(2, 4, K))
    assert torch.equal(ae.decode(mean), back.decode(mean))
    assert verify_checkpoint(tmp_path / "native")["kind"] == "autoencoder" and ckpt.is_dir()


def test_calm_round_trip_is_exact(world, vocab, bpe_tokenizer_file, tmp_path):
    cfg = tiny_model_config("calm", vocab)
    model = perturb_(CALM(cfg), seed=2).eval()
    ae = perturb_(Autoencoder(cfg.ae, vocab, K), seed=3).eval()
    write_checkpoint(tmp_path / "run", cfg, model, bpe_tokenizer_file, autoencoder=ae)
    run_convert(tmp_path / "run", tmp_path / "hf", to="hf")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"transformer", "embed_proj", "mlp_generator", "ae_model"}
    run_convert(tmp_path / "hf", tmp_path / "native", to="native")
    loaded = load_for_inference(str(tmp_path / "native"), CPU)
    tokens = tokens_BL(vocab)
    with torch.no_grad():
        assert torch.equal(model(tokens, rng(), ae), loaded.model(tokens, rng(), loaded.autoencoder))
    prompt = load_tokenizer(bpe_tokenizer_file).encode("The quick brown fox")
    ours = generate_calm(model, ae, prompt, 12, 0.0, seed=5, pad_id=0, num_samples=8)
    assert generate_calm(loaded.model, loaded.autoencoder, prompt, 12, 0.0, seed=5, pad_id=0, num_samples=8) == ours


# ---------------------------------------------------------------------------------------------
# a checkpoint written in the reference layout (keys spelled out here, random weights)


def reference_autoencoder_state(vocab_size, g):
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)            # noqa: E731
    one = lambda n: 1 + 0.1 * torch.randn(n, generator=g)                 # noqa: E731
    s = {"encoder.embed_tokens.weight": r(vocab_size, H), "encoder.squeeze_layer.weight": r(H, K * H),
         "encoder.squeeze_layer.bias": r(H), "encoder.norm.weight": one(H),
         "encoder.hidden_to_latent.weight": r(2 * LATENT, H), "encoder.hidden_to_latent.bias": r(2 * LATENT),
         "decoder.latent_to_hidden.weight": r(H, LATENT), "decoder.latent_to_hidden.bias": r(H),
         "decoder.expand_layer.weight": r(K * H, H), "decoder.expand_layer.bias": r(K * H),
         "decoder.norm.weight": one(H)}
    for part in ("encoder", "decoder"):
        for i in range(2):
            p = f"{part}.{part}_layers.{i}."
            s.update({p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                      p + "mlp.down_proj.weight": r(H, I), p + "layernorm.weight": one(H)})
    return s


def reference_calm_state(vocab_size, head_prefix, g):
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)            # noqa: E731
    one = lambda n: 1 + 0.1 * torch.randn(n, generator=g)                 # noqa: E731
    s = {"transformer.embed_tokens.weight": r(vocab_size, H), "transformer.norm.weight": one(H),
         "embed_proj.0.weight": r(2 * H, K * H), "embed_proj.0.bias": r(2 * H), "embed_proj.2.weight": r(H, 2 * H),
         "embed_proj.2.bias": r(H), "embed_proj.3.weight": one(H), "embed_proj.3.bias": r(H)}
    for i in range(2):
        p = f"transformer.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(H // 2, H),
                  p + "self_attn.v_proj.weight": r(H // 2, H), p + "self_attn.o_proj.weight": r(H, H),
                  p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                  p + "mlp.down_proj.weight": r(H, I), p + "input_layernorm.weight": one(H),
                  p + "post_attention_layernorm.weight": one(H)})
    head = {"noise_embd.weight": r(H, NOISE), "noise_embd.bias": r(H), "hidden_embd.weight": r(H, H),
            "hidden_embd.bias": r(H), "norm_hidden.weight": one(H), "norm_hidden.bias": r(H),
            "norm_noise.weight": one(H), "norm_noise.bias": r(H), "final_layer.in_ln.weight": one(H),
            "final_layer.in_ln.bias": r(H), "final_layer.linears.0.weight": r(H, H), "final_layer.linears.0.bias": r(H),
            "final_layer.linears.2.weight": r(LATENT, H), "final_layer.linears.2.bias": r(LATENT)}
    for i in range(2):
        p = f"mlp_blocks.{i}."
        head.update({p + "in_ln.weight": one(H), p + "in_ln.bias": r(H), p + "linears.0.weight": r(H, 2 * H),
                     p + "linears.0.bias": r(H), p + "linears.2.weight": r(H, H), p + "linears.2.bias": r(H),
                     p + "linears.4.weight": r(2 * H, H), p + "linears.4.bias": r(2 * H),
                     p + "down_proj.weight": r(H, H), p + "down_proj.bias": r(H)})
    s.update({head_prefix + k: v for k, v in head.items()})
    s.update({"ae_model." + k: v for k, v in reference_autoencoder_state(vocab_size, g).items()})
    return s


CALM_CONFIG = {"patch_size": K, "latent_size": LATENT, "num_mlp_layers": 2, "num_samples": 4, "beta": 1.0,
               "noise_size": NOISE, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500.0, "rms_norm_eps": 1e-5}
AE_CONFIG = {"patch_size": K, "latent_size": LATENT, "hidden_size": H, "intermediate_size": I,
             "num_encoder_layers": 2, "num_decoder_layers": 2, "ae_dropout": 0.15, "kl_clamp": 0.5,
             "kl_weight": 1e-3, "rms_norm_eps": 1e-6}


def write_reference_dir(directory, config, state, tokenizer_file, fmt="safetensors"):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(tokenizer_file, directory / "tokenizer.json")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(directory / "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:                                                          # two safetensors shards + index
        from safetensors.torch import save_file
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, str(directory / name))
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    return directory


def strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("fmt,head_prefix", [("safetensors", "mlp_generator."), ("bin", "generative_head."),
                                             ("sharded", "mlp_generator.")])
def test_reference_calm_imports_and_matches_an_independent_forward(world, vocab, bpe_tokenizer_file, tmp_path,
                                                                   fmt, head_prefix):
    from transformers import LlamaConfig, LlamaModel
    ref = reference_calm_state(vocab, head_prefix, torch.Generator().manual_seed(11))
    src = write_reference_dir(tmp_path / "ref", {**CALM_CONFIG, "vocab_size": vocab}, ref, bpe_tokenizer_file, fmt)
    run_convert(src, tmp_path / "native", to="native")
    loaded = load_for_inference(str(tmp_path / "native"), CPU)

    # independent forward: embed_proj by hand, the backbone as transformers' Llama, head and AE from the reference keys
    llama = LlamaModel(LlamaConfig(**{k: CALM_CONFIG[k] for k in ("hidden_size", "intermediate_size",
                       "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rope_theta",
                       "rms_norm_eps")}, vocab_size=vocab, max_position_embeddings=64)).eval()
    llama.load_state_dict(strip(ref, "transformer."), strict=True)
    p = strip(ref, "embed_proj.")
    tokens = tokens_BL(vocab)
    chunks_BTKH = torch.nn.functional.embedding(tokens.view(2, 4, K), ref["transformer.embed_tokens.weight"])
    x = torch.nn.functional.linear(chunks_BTKH.flatten(-2), p["0.weight"], p["0.bias"])
    x = torch.nn.functional.linear(torch.nn.functional.silu(x), p["2.weight"], p["2.bias"])
    x = torch.nn.functional.layer_norm(x, (H,), p["3.weight"], p["3.bias"], eps=1e-6)
    head = EnergyHead(H, LATENT, loaded.cfg.model.head).eval()
    head.load_state_dict(strip(ref, head_prefix), strict=True)
    ae = Autoencoder(loaded.autoencoder.arch, vocab, K).eval()
    ae.load_state_dict(strip(ref, "ae_model."), strict=True)
    with torch.no_grad():
        hidden_BTH = llama(inputs_embeds=x).last_hidden_state
        assert (loaded.model.hidden(tokens) - hidden_BTH).abs().max().item() < 1e-4
        r, spec = rng(), loaded.cfg.model.head    # the model's draw order: posterior targets, then head noise
        assert (spec.num_samples, spec.num_target_samples) == (4, 100)      # M: our default, not in the release
        targets = ae.posterior_samples(tokens.view(2, 4, K)[:, 1:], 100, r)
        expected = energy_score(head.sample(hidden_BTH[:, :-1], 4, r), targets).mean()
        got = loaded.model(tokens, rng(), loaded.autoencoder)
    assert abs(got.item() - expected.item()) < 1e-5 and got.item() > 0.05


def test_reference_autoencoder_imports_and_serves_the_frozen_loader(world, vocab, bpe_tokenizer_file, tmp_path):
    ref = reference_autoencoder_state(vocab, torch.Generator().manual_seed(12))
    src = write_reference_dir(tmp_path / "ae", {**AE_CONFIG, "vocab_size": vocab}, ref, bpe_tokenizer_file, "bin")
    arch, vocab_size, patch_size, weights = read_reference_autoencoder_config(src)
    assert (arch.hidden_size, arch.intermediate_size, arch.latent_size, vocab_size, patch_size, weights.name) == \
        (H, I, LATENT, vocab, K, "pytorch_model.bin")
    direct = Autoencoder(arch, vocab, K).eval()
    direct.load_state_dict(load_reference_autoencoder_weights(weights), strict=True)
    run_convert(src, tmp_path / "native", to="native")
    back = load_for_inference(str(tmp_path / "native"), CPU).model
    tokens = tokens_BL(vocab)
    assert torch.equal(direct(tokens, rng()).loss, back(tokens, rng()).loss)
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in ref.items())

    # the same autoencoder inside a CALM release (sizes read off the weights: no ae_config)
    calm_ref = reference_calm_state(vocab, "mlp_generator.", torch.Generator().manual_seed(12))
    calm = write_reference_dir(tmp_path / "calm", {**CALM_CONFIG, "vocab_size": vocab}, calm_ref, bpe_tokenizer_file)
    arch2, _, _, weights2 = read_reference_autoencoder_config(calm)
    assert (arch2.hidden_size, arch2.num_decoder_layers, arch2.latent_size) == (H, 2, LATENT)
    from_calm = load_reference_autoencoder_weights(weights2)
    assert from_calm.keys() == ref.keys()
    assert all(torch.equal(v, calm_ref["ae_model." + k]) for k, v in from_calm.items())


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_missing_key_or_wrong_shape_names_the_key_and_the_file(vocab, bpe_tokenizer_file, tmp_path, fmt):
    good = reference_calm_state(vocab, "mlp_generator.", torch.Generator().manual_seed(13))
    config = {**CALM_CONFIG, "vocab_size": vocab}
    missing = dict(good)
    del missing["transformer.layers.1.mlp.up_proj.weight"]
    src = write_reference_dir(tmp_path / "missing", config, missing, bpe_tokenizer_file, fmt)
    with pytest.raises(ConvertError) as err:
        run_convert(src, tmp_path / "out1", to="native")
    weights_file = "model.safetensors.index.json" if fmt == "sharded" else "model.safetensors"
    assert "'transformer.layers.1.mlp.up_proj.weight' is missing" in str(err.value)
    assert str(src / weights_file) in str(err.value)

    bad = {**good, "mlp_generator.noise_embd.weight": good["mlp_generator.noise_embd.weight"].T.contiguous()}
    src = write_reference_dir(tmp_path / "shape", config, bad, bpe_tokenizer_file, fmt)
    with pytest.raises(ConvertError) as err:
        run_convert(src, tmp_path / "out2", to="native")
    message = str(err.value)
    assert "'mlp_generator.noise_embd.weight' has shape [8, 32], the config says [32, 8]" in message
    shard = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][
        "mlp_generator.noise_embd.weight"] if fmt == "sharded" else "model.safetensors"
    assert str(src / shard) in message
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_missing_config_field_names_the_field_and_the_file(vocab, bpe_tokenizer_file, tmp_path):
    config = {k: v for k, v in {**AE_CONFIG, "vocab_size": vocab}.items() if k != "latent_size"}
    src = write_reference_dir(tmp_path / "ae", config, reference_autoencoder_state(vocab, torch.Generator()),
                              bpe_tokenizer_file)
    with pytest.raises(ConvertError, match=r"ae/config.json: key 'latent_size' is missing"):
        run_convert(src, tmp_path / "out", to="native")


def test_failed_conversion_leaves_no_destination(vocab, bpe_tokenizer_file, tmp_path):
    src = write_reference_dir(tmp_path / "ae", {**AE_CONFIG, "vocab_size": vocab},
                              reference_autoencoder_state(vocab, torch.Generator()), bpe_tokenizer_file)
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConvertError, match=r"ae holds no tokenizer.json or tokenizer.model"):
        run_convert(src, tmp_path / "out", to="native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]

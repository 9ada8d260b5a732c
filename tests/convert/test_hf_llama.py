"""AR baseline <-> transformers' LlamaForCausalLM: same logits, same greedy tokens, loadable tokenizer, round trips
(tied and untied), checkpoints transformers itself saved (tied, bf16 / fp32, GQA, safetensors / .bin), and an
export that `generate(**tok(...))` and `pipeline("text-generation")` use as it is."""
import json
import os
import shutil

import pytest
import torch
import yaml

from calm_train.config import ConfigError
from calm_train.convert.cli import run_convert
from calm_train.convert.hf_llama import fuse_qkv, split_qkv
from calm_train.convert.weights import ConvertError
from calm_train.data.tokenizer import load_tokenizer
from calm_train.models.ar import ARModel
from calm_train.models.generate import generate_ar
from calm_train.parallel import runtime
from calm_train.convert.native import verify_checkpoint
from calm_train.train.inference import load_for_inference

from .conftest import native_state, tiny_model_config, write_checkpoint

TEXT = "The lazy fox predicts the next vector: 12345 words."


@pytest.fixture(scope="module")
def world():
    with runtime.single_process(seed=0) as w:
        yield w


@pytest.fixture(scope="module")
def ar(world, bpe_tokenizer_file, tmp_path_factory):
    """(model, checkpoint dir, exported dir)."""
    vocab = load_tokenizer(bpe_tokenizer_file).vocab_size
    model = ARModel(tiny_model_config("ar", vocab)).eval()
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ar_run"), tiny_model_config("ar", vocab), model,
                            bpe_tokenizer_file)
    exported = tmp_path_factory.mktemp("ar_hf") / "hf"
    assert run_convert(ckpt.parent.parent, exported, to="hf") == 0
    return model, ckpt, exported


def test_qkv_split_inverts_fuse_and_follows_megatron_groups():
    arch = tiny_model_config("ar", 8).backbone                     # 4 query heads, 2 groups, head_dim 8
    rows = torch.arange(64.0)[:, None].expand(64, 32)              # row r holds the value r
    q, k, v = split_qkv(rows, arch)
    # group 0: rows 0-15 = q heads 0,1; 16-23 = k0; 24-31 = v0; group 1: 32-47 q heads 2,3; 48-55 k1; 56-63 v1
    assert q[:, 0].tolist() == list(range(0, 16)) + list(range(32, 48))
    assert k[:, 0].tolist() == list(range(16, 24)) + list(range(48, 56))
    assert v[:, 0].tolist() == list(range(24, 32)) + list(range(56, 64))
    assert torch.equal(fuse_qkv(q, k, v, arch), rows)


def test_exported_llama_gives_our_logits(ar):
    from transformers import LlamaForCausalLM
    model, _, exported = ar
    hf = LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, model.model_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.logits(tokens), hf(tokens).logits
    assert ours.abs().max() > 1.0                                  # not a degenerate near-zero model
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generation_matches_transformers(ar):
    from transformers import LlamaForCausalLM
    model, ckpt, exported = ar
    hf = LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    prompt = load_tokenizer(ckpt / "tokenizer" / "tokenizer.json").encode(TEXT)
    ours = generate_ar(model, prompt, 20, temperature=0.0, seed=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                          eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == ours
    assert len(set(ours)) > 1


def test_auto_tokenizer_loads_from_the_export(ar):
    from transformers import AutoTokenizer
    _, ckpt, exported = ar
    ours = load_tokenizer(ckpt / "tokenizer" / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(exported)
    assert theirs.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
    config = json.loads((exported / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (ours.eos_id, ours.pad_id)


def test_tiktoken_tokenizer_exports_as_fast_tokenizer(world, tiktoken_file, tmp_path):
    from transformers import AutoTokenizer
    tok = load_tokenizer(tiktoken_file)
    assert tok.backend == "tiktoken"
    model = ARModel(tiny_model_config("ar", tok.vocab_size)).eval()
    ckpt = write_checkpoint(tmp_path / "run", tiny_model_config("ar", tok.vocab_size), model, tiktoken_file)
    run_convert(ckpt, tmp_path / "hf", to="hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert theirs.convert_tokens_to_ids("<|pad|>") == tok.pad_id == tok.vocab_size - 1


def test_import_round_trip_is_exact_and_loads_for_inference(ar, tmp_path):
    model, ckpt, exported = ar
    back = tmp_path / "native"
    run_convert(exported, back, to="native", tp=2, pp=2)
    manifest = verify_checkpoint(back)
    assert manifest["layout"] == {"tp": 2, "pp": 2} and manifest["kind"] == "ar"
    saved = yaml.safe_load((back / "config.yaml").read_text())
    assert (saved["parallel"]["tp"], saved["parallel"]["pp"]) == (2, 2)
    loaded = load_for_inference(str(back), torch.device("cpu"))
    for key, value in native_state(model).items():
        assert torch.equal(native_state(loaded.model)[key], value), key
    tokens = torch.randint(0, model.model_cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.model.logits(tokens), model.logits(tokens))
    assert loaded.tokenizer.encode(TEXT) == load_tokenizer(ckpt / "tokenizer" / "tokenizer.json").encode(TEXT)


def test_layout_that_does_not_fit_the_model_is_rejected_before_writing(ar, tmp_path):
    _, _, exported = ar
    with pytest.raises(ConfigError, match="parallel.tp"):
        run_convert(exported, tmp_path / "bad", to="native", tp=3)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConvertError, match="--to native"):
        run_convert(exported, tmp_path / "bad", to="hf", tp=2)


def test_llama_features_the_backbone_lacks_are_named(ar, tmp_path):
    import shutil
    _, _, exported = ar
    src = shutil.copytree(exported, tmp_path / "scaled")
    config = json.loads((src / "config.json").read_text())
    config.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}, attention_bias=True)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match=r"scaled/config.json: attention_bias, rope_scaling set"):
        run_convert(src, tmp_path / "out", to="native")


# ---------------------------------------------------------------------------------------------
# tied output layers, checkpoints transformers wrote, and what transformers users do with an export

ROUND_TRIP_ATOL = 1e-5       # our logits vs transformers' (measured <= 3.7e-6; HF -> native -> HF is exact)
IMPORT_ATOL = 2e-5           # the same with transformers' own init (|logits| ~ 4.5; measured <= 6.8e-6)


def hf_logits(directory, tokens):
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_ar_hf_native_hf_keeps_the_logits(world, bpe_tokenizer_file, tmp_path, tied):
    vocab = load_tokenizer(bpe_tokenizer_file).vocab_size
    model = ARModel(tiny_model_config("ar", vocab)).eval()
    if tied:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.embed_tokens.weight)
    write_checkpoint(tmp_path / "run", tiny_model_config("ar", vocab), model, bpe_tokenizer_file)
    run_convert(tmp_path / "run", tmp_path / "hf", to="hf")
    run_convert(tmp_path / "hf", tmp_path / "native", to="native")
    run_convert(tmp_path / "native", tmp_path / "hf2", to="hf")
    from safetensors import safe_open
    for directory in ("hf", "hf2"):
        assert json.loads((tmp_path / directory / "config.json").read_text())["tie_word_embeddings"] is tied
        with safe_open(str(tmp_path / directory / "model.safetensors"), "pt") as f:
            assert ("lm_head.weight" in f.keys()) is not tied          # transformers' own layout of a tied model
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(tokens)
        back = load_for_inference(str(tmp_path / "native"), torch.device("cpu")).model.logits(tokens)
    first, second = hf_logits(tmp_path / "hf", tokens), hf_logits(tmp_path / "hf2", tokens)
    assert ours.abs().max() > 1.0
    assert torch.equal(back, ours) and torch.equal(first, second)
    assert (first - ours).abs().max().item() < ROUND_TRIP_ATOL


def transformers_llama(tied: bool, seed: int = 0):
    """A LlamaForCausalLM with GQA (4 query heads, 2 key/value heads), weights moved off their init."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                         max_position_embeddings=64, tie_word_embeddings=tied, eos_token_id=318, pad_token_id=319,
                         bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied,dtype,safe", [(True, torch.bfloat16, True), (True, torch.float32, False),
                                             (True, torch.float32, True), (False, torch.bfloat16, False)])
def test_checkpoints_transformers_saved_import_with_their_logits(world, bpe_tokenizer_file, tmp_path, tied, dtype,
                                                                 safe):
    src = tmp_path / "llama"
    transformers_llama(tied).to(dtype).save_pretrained(src, safe_serialization=safe)
    shutil.copy(bpe_tokenizer_file, src / "tokenizer.json")
    tokens = torch.randint(0, 318, (2, 24), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(src, tokens)                                # the saved weights, computed in fp32
    run_convert(src, tmp_path / "native", to="native")
    for spec in (src, tmp_path / "native"):                          # read in memory, and converted
        loaded = load_for_inference(str(spec), torch.device("cpu"))
        with torch.no_grad():
            got = loaded.model.logits(tokens)
        assert (got - expected).abs().max().item() < IMPORT_ATOL, spec
    assert loaded.cfg.model.backbone.kv_heads == 2
    saved = transformers_llama(tied).to(dtype).state_dict()                  # every weight arrives unchanged
    assert torch.equal(loaded.model.embed_tokens.weight, saved["model.embed_tokens.weight"].float())
    assert torch.equal(loaded.model.lm_head.weight, saved["lm_head.weight"].float())


def test_a_tied_llama_whose_lm_head_differs_is_refused(bpe_tokenizer_file, tmp_path):
    src = tmp_path / "llama"
    model = transformers_llama(tied=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"][3] += 0.5
    model.config.save_pretrained(src)
    torch.save(state, src / "pytorch_model.bin")
    shutil.copy(bpe_tokenizer_file, src / "tokenizer.json")
    with pytest.raises(ConvertError, match=r"'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        run_convert(src, tmp_path / "out", to="native")


def test_transformers_users_run_the_export_as_it_is(ar):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline
    _, ckpt, exported = ar
    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert tok.model_max_length == 16 and tok.model_input_names == ["input_ids", "attention_mask"]
    generation = GenerationConfig.from_pretrained(exported)
    assert (generation.eos_token_id, generation.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    inputs = tok(TEXT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)
    text = pipeline("text-generation", model=str(exported), device="cpu")(TEXT, max_new_tokens=5, do_sample=False)
    assert text[0]["generated_text"].startswith(TEXT) and len(text[0]["generated_text"]) > len(TEXT)


def test_exported_files_are_readable_by_everyone(ar, tmp_path):
    _, ckpt, _ = ar
    umask = os.umask(0o077)
    try:
        run_convert(ckpt, tmp_path / "hf", to="hf")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "hf", *(tmp_path / "hf").iterdir()]}
    assert modes["hf"] == 0o755 and {m for n, m in modes.items() if n != "hf"} == {0o644}, modes
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(modes)


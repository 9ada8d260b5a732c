"""`model.init_from`: a new run starts at step 0 from an exported Hugging Face Llama directory (AR) or a directory
in the CALM reference release's layout (CALM), with a first-step loss equal to the source model's loss on the
same batch (computed by transformers, resp. by an independent forward with the run's noise); the source is
recorded, ignored once the run has its own checkpoint, refused with one line when it does not fit; a tp=2 warm
start equals the 1-process one; `eval` reads the exported directory."""
import json
import pathlib
import shutil
import sys

import pytest
import torch
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "convert"))
import reference_layout as ref  # noqa: E402
from runs import Job, calm_train, final_weights, in_one_process, metrics, rehash  # noqa: E402

SEED = 1234                           # train.seed of the tiny configs
TINY_CALM = ref.Sizes(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_blocks=2, noise=16, latent=16,
                      patch=4, ae_hidden=64, ae_intermediate=128, ae_layers=2, rope_theta=10000.0, norm_eps=1e-6)


def first_batch(data: pathlib.Path, batch: int = 8):
    """The global batch of step 1 of a 1-process run (the loader the run builds, same seed)."""
    from calm_train.data.loader import TokenLoader
    loader = TokenLoader(data, "train", batch_size=batch, dp_rank=0, dp_size=1, seed=SEED, verify=False)
    try:
        first = next(iter(loader))
    finally:
        loader.close()
    return first["tokens"], first["sample_ids"]


def train(run, config, data, *extra):
    return calm_train("train", config, f"run_dir={run}", f"data.train={data}", "logging.progress=false", *extra)


@pytest.fixture(scope="module")
def ar_export(tiny_data, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(a 2-step AR run, its Hugging Face export)."""
    root = tmp_path_factory.mktemp("ar_source")
    train(root / "run", "tiny_ar", tiny_data, "train.steps=2")
    calm_train("convert", str(root / "run"), str(root / "hf"), "--to", "hf")
    return root / "run", root / "hf"


@pytest.fixture(scope="module")
def ar_warm(ar_export, tiny_data, tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("ar_warm") / "run"
    train(run, "tiny_ar", tiny_data, f"model.init_from={ar_export[1]}", "train.steps=2")
    return run


def test_ar_warm_start_from_an_export_continues_the_source_model(ar_export, ar_warm, tiny_data):
    from transformers import LlamaForCausalLM
    source_run, exported = ar_export
    tokens, _ = first_batch(tiny_data)
    hf = LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(tokens, labels=tokens).loss.item()            # mean next-token CE, as the AR loss
    rows = metrics(ar_warm)
    assert [r["step"] for r in rows] == [1, 2]
    assert abs(rows[0]["loss"] - expected) < 1e-5, (rows[0]["loss"], expected)
    assert abs(rows[0]["loss"] - metrics(source_run)[0]["loss"]) > 1e-3     # not the source's fresh start

    from calm_train.files import sha256_file
    record = {"path": str(exported.resolve()), "weights_sha256": sha256_file(exported / "model.safetensors")}
    state = json.loads((ar_warm / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["identity"]["init_from"] == record
    assert state["progress"]["step"] == 2
    saved = yaml.safe_load((ar_warm / "config.yaml").read_text())["model"]
    assert (saved["init_from"], saved["init_from_sha256"]) == (record["path"], record["weights_sha256"])
    source_state = json.loads((source_run / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["identity"]["model"] == source_state["identity"]["model"]   # the source is not part of the model hash
    assert source_state["identity"]["init_from"] is None


def test_relaunch_resumes_from_its_own_checkpoint_without_the_source(ar_export, ar_warm, tiny_data, tmp_path):
    import shutil
    run = shutil.copytree(ar_warm, tmp_path / "run")
    moved = ar_export[1].rename(ar_export[1].with_name("hf_moved_away"))
    try:
        proc = train(run, "tiny_ar", tiny_data, f"model.init_from={ar_export[1]}", "train.steps=3")
    finally:
        moved.rename(ar_export[1])
    assert "is not read: the run resumes from its own checkpoint" in proc.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    state = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["identity"]["init_from"]["path"] == str(ar_export[1].resolve())


def test_tp2_warm_start_equals_the_one_process_warm_start(ar_export, ar_warm, tiny_data, tmp_path):
    run = tmp_path / "tp2"
    job = Job(2, ["train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "logging.progress=false",
                  f"model.init_from={ar_export[1]}", "train.steps=2", "parallel.tp=2"], tmp_path / "log")
    assert job.wait() == 0, job.output()[-3000:]
    ours, single = metrics(run), metrics(ar_warm)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    one, two = final_weights(ar_warm), final_weights(run)
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_a_native_run_and_its_export_give_the_same_full_state(ar_export, tiny_data, tmp_path):
    from safetensors.torch import load_file
    from calm_train.config import load_config
    from calm_train.files import sha256_file
    from calm_train.train.loop import resolve_data
    from calm_train.train.warm_start import WarmStart
    source_run, exported = ar_export
    ckpt = source_run / "checkpoints" / "step_00000002"
    states = []
    for spec in (source_run, exported):
        cfg = load_config("tiny_ar", [f"run_dir={tmp_path / 'r'}", f"data.train={tiny_data}", f"model.init_from={spec}"])
        resolve_data(cfg)
        states.append(WarmStart(cfg, tmp_path / "r").take_state())
    assert cfg.model.init_from == str(exported.resolve())
    assert (cfg.model.init_from_sha256, states[0].keys()) == (sha256_file(exported / "model.safetensors"),
                                                              load_file(str(ckpt / "model.safetensors")).keys())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_eval_reads_the_exported_directory(ar_export, tiny_data):
    from calm_train.train.inference import evaluate_checkpoint
    source_run, exported = ar_export
    ours = evaluate_checkpoint(str(source_run), data=str(tiny_data), max_tokens=256)
    theirs = evaluate_checkpoint(str(exported), data=str(tiny_data), max_tokens=256)
    assert theirs["kind"] == "ar" and theirs["tokens"] == ours["tokens"] == 256
    for key in ("brier1", "brier2", "brierlm"):
        assert theirs[key] == pytest.approx(ours[key], rel=1e-6), key
    assert ours["brier1"] > 0


@pytest.fixture(scope="module")
def calm_release(tiny_data, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A CALM release directory of tiny_calm's sizes as the reference's scripts write it (pytorch_model.bin with
    aliases, ae_path naming the author's machine), with the data's tokenizer."""
    from calm_train.data.dataset_info import read_dataset_info
    vocab = read_dataset_info(tiny_data).vocab_size
    state = ref.calm_state(TINY_CALM, vocab, torch.Generator().manual_seed(21))
    config = ref.calm_config(TINY_CALM, vocab, "/path/to/the/code/checkpoints/autoencoder")
    directory = ref.write_release(tmp_path_factory.mktemp("release") / "calm", config, state,
                                  tiny_data / "tokenizer.json", "bin")
    return directory, state


def test_calm_warm_start_from_a_reference_release_has_the_source_loss(calm_release, tiny_data, tmp_path):
    from calm_train.models.rng import SampleRNG, sample_seeds
    release, weights = calm_release
    run = tmp_path / "calm"
    proc = train(run, "tiny_calm", tiny_data, f"model.init_from={release}", "train.steps=1")   # no model.autoencoder
    assert "warm start from" in proc.stderr
    tokens, ids = first_batch(tiny_data)
    expected = ref.calm_loss(weights, TINY_CALM, weights["transformer.embed_tokens.weight"].shape[0], tokens,
                             SampleRNG(sample_seeds(SEED, 1, ids)), num_samples=8, num_target_samples=100).item()
    loss = metrics(run)[0]["loss"]
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-5) and loss > 0.01
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["autoencoder"] == str(release)                     # the source's frozen autoencoder
    ckpt = run / "checkpoints" / "step_00000001"
    from safetensors.torch import load_file
    frozen = load_file(str(ckpt / "autoencoder.safetensors"))
    assert all(torch.equal(v, weights["ae_model." + k]) for k, v in frozen.items())


def test_an_autoencoder_run_warm_starts_from_a_reference_autoencoder(calm_release, tiny_data, tmp_path):
    from calm_train.config import load_config
    from calm_train.train.loop import resolve_data
    from calm_train.train.warm_start import WarmStart
    release, weights = calm_release
    ae = ref.strip(weights, "ae_model.")
    vocab = ae["encoder.embed_tokens.weight"].shape[0]
    src = ref.write_release(tmp_path / "ae", ref.autoencoder_config(TINY_CALM, vocab), ae, tiny_data / "tokenizer.json")
    cfg = load_config("tiny_autoencoder", [f"run_dir={tmp_path / 'r'}", f"data.train={tiny_data}",
                                           f"model.init_from={src}"])
    resolve_data(cfg)
    state = WarmStart(cfg, tmp_path / "r").take_state()
    assert state.keys() == {k for k in ae if k != "decoder.lm_head_weight"}
    assert all(torch.equal(v, ae[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# refusals: one line before any process group, nothing written


def refused(capsys, run, *args) -> str:
    from calm_train.cli import main
    assert main(["train", *args, f"run_dir={run}", "logging.progress=false"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("calm-train train: error: config key") and "Fix:" in err, err
    assert not run.exists()
    return err


def test_a_source_that_does_not_fit_is_refused_in_one_line(ar_export, calm_release, tiny_data, tmp_path, capsys):
    _, exported = ar_export
    data = f"data.train={tiny_data}"
    err = refused(capsys, tmp_path / "r1", "tiny_ar", data, f"model.init_from={exported}",
                  "model.backbone.hidden_size=32", "model.backbone.num_layers=4")
    assert "'model.backbone.hidden_size' is 32 but model.init_from" in err and "has 64" in err
    assert "Fix: add model.backbone.hidden_size=64 model.backbone.num_layers=2" in err
    err = refused(capsys, tmp_path / "r2", "tiny_calm", data, f"model.init_from={exported}")
    assert "holds a model of kind ar, the run trains kind calm" in err
    err = refused(capsys, tmp_path / "r3", "tiny_ar", data, f"model.init_from={calm_release[0]}")
    assert "holds a model of kind calm" in err
    err = refused(capsys, tmp_path / "r4", "tiny_ar", data, f"model.init_from={tmp_path / 'nowhere'}")
    assert "'model.init_from'" in err and "nowhere does not exist" in err


def test_a_source_with_another_vocabulary_is_refused(ar_export, tiny_data, tmp_path, capsys):
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    other = shutil.copytree(ar_export[1], tmp_path / "other_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["completely different text " * 50], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    (other / "tokenizer.json").write_text(tok.to_str())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    err = refused(capsys, tmp_path / "r", "tiny_ar", f"data.train={tiny_data}", f"model.init_from={other}")
    assert "the tokenizer of" in err and "differs from the data's" in err
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    err = refused(capsys, tmp_path / "r", "tiny_ar", f"data.train={tiny_data}", f"model.init_from={other}")
    assert "has a vocabulary of 300 but the data" in err


def test_a_calm_warm_start_against_another_autoencoder_than_its_sources_says_so(tiny_calm_run, tiny_ae, tiny_data,
                                                                                tmp_path):
    from safetensors.torch import load_file, save_file
    other = tmp_path / "other_ae"
    shutil.copytree(tiny_ae, other)
    ckpt = other / "checkpoints" / "step_00000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    rehash(ckpt, "model.safetensors")
    args = ["train", "tiny_calm", f"data.train={tiny_data}", f"model.init_from={tiny_calm_run}", "train.steps=1",
            "logging.progress=false"]
    same, foreign = in_one_process([*args, f"run_dir={tmp_path / 'same'}", f"model.autoencoder={tiny_ae}"],
                                   [*args, f"run_dir={tmp_path / 'foreign'}", f"model.autoencoder={other}"])
    assert same["code"] == 0 and foreign["code"] == 0, (same["err"][-3000:], foreign["err"][-3000:])
    assert "was trained against the autoencoder" not in same["err"]
    [note] = [line for line in foreign["err"].splitlines() if "was trained against the autoencoder" in line]
    assert f"note: model.init_from={tiny_calm_run} was trained against the autoencoder" in note, note
    assert f"model.autoencoder={ckpt}" in note and "other latents than its source's" in note, note

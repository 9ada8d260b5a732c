"""The config tree: named configs load, overrides apply, and every invalid config names its key."""
import pytest

from calm_train.config import ConfigError, load_config, named_configs, to_yaml, config_from_tree, validate
import yaml

CALM = ["model.autoencoder=runs/ae"]


@pytest.mark.parametrize("name", named_configs())
def test_named_configs_load_and_validate(name):
    cfg = load_config(name, CALM if "calm" in name else [])
    assert cfg.model.kind in ("autoencoder", "calm", "ar")
    assert config_from_tree(yaml.safe_load(to_yaml(cfg))) == cfg        # the resolved YAML round-trips


def test_paper_sizes():
    m = load_config("calm_m", CALM).model
    assert (m.backbone.hidden_size, m.backbone.intermediate_size, m.backbone.num_layers, m.backbone.num_heads) == (1024, 2752, 16, 16)
    assert (m.head.num_blocks, m.head.num_samples, m.head.num_target_samples, m.patch_size) == (4, 8, 100, 4)
    ae = load_config("autoencoder").model.ae
    assert (ae.hidden_size, ae.intermediate_size, ae.num_encoder_layers, ae.num_decoder_layers, ae.latent_size) == (512, 1280, 2, 2, 128)
    assert (ae.kl_clamp, ae.kl_weight, ae.ae_dropout, ae.mask_prob) == (0.5, 1e-3, 0.15, 0.15)
    assert load_config("calm_l", CALM).model.backbone.hidden_size == 1536      # `base:` inheritance


def test_overrides_are_typed():
    assert load_config("tiny_calm", CALM + ["train.lr=3e-4"]).train.lr == 3e-4      # no dot: YAML 1.1 says str
    cfg = load_config("tiny_calm", CALM + ["train.lr=0.01", "parallel.tp=2", "train.steps=7", "data.seq_len=64",
                                           "parallel.sequence_parallel=true"])
    assert (cfg.train.lr, cfg.parallel.tp, cfg.train.steps, cfg.data.seq_len) == (0.01, 2, 7, 64)
    assert cfg.parallel.sequence_parallel is True
    # YAML 1.2 booleans: on/off/yes/no stay strings for string keys
    cfg = load_config("tiny_calm", CALM + ["logging.wandb=off", "perf.compile=on", "perf.recompute=off"])
    assert (cfg.logging.wandb, cfg.perf.compile, cfg.perf.recompute) == ("off", "on", "off")


INVALID = [
    # (overrides on tiny_calm, key named in the error, world size or None)
    (["model.kind=gpt"], "model.kind", None),
    (["model.patch_size=0"], "model.patch_size", None),
    (["data.seq_len=30"], "data.seq_len", None),
    (["model.attention=xformers"], "model.attention", None),
    (["train.eval_samples=1"], "train.eval_samples", None),
    (["parallel.tp=3"], "parallel.tp", None),
    (["model.backbone.num_heads=5"], "model.backbone.num_heads", None),
    (["model.backbone.num_kv_heads=3"], "model.backbone.num_kv_heads", None),
    (["parallel.pp=3"], "parallel.pp", None),
    (["parallel.tp=2", "model.vocab_size=511"], "parallel.tp", None),
    (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage", None),
    (["parallel.pp=2", "parallel.zero_stage=3"], "parallel.zero_stage", None),
    (["parallel.zero_stage=4"], "parallel.zero_stage", None),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", None),
    (["model.autoencoder="], "model.autoencoder", None),
    (["model.head.num_samples=1"], "model.head.num_samples", None),
    (["model.head.beta=2.5"], "model.head.beta", None),
    (["model.head.init=xavier"], "model.head.init", None),
    (["train.global_batch=6"], "train.global_batch", None),
    (["train.lr=0"], "train.lr", None),
    (["train.schedule=linear"], "train.schedule", None),
    (["train.dtype=fp16"], "train.dtype", None),
    (["logging.wandb=cloud"], "logging.wandb", None),
    (["perf.compile=max"], "perf.compile", None),
    (["perf.compile=on", "parallel.zero_stage=3"], "perf.compile", None),
    (["perf.fused_adamw=yes"], "perf.fused_adamw", None),
    (["perf.recompute=attention"], "perf.recompute", None),
    (["train.keep_last=0"], "train.keep_last", None),
    (["model.ae.ae_dropout=1.5"], "model.ae.ae_dropout", None),
    (["train.bogus=1"], "train.bogus", None),
    (["train.steps=many"], "train.steps", None),
    (["parallel.tp=2"], "parallel.tp", 3),                                   # 3 processes cannot hold tp=2
    (["train.global_batch=12"], "train.global_batch", 2),                     # 12 % (4 x dp 2) != 0
    (["parallel.pp=2", "train.global_batch=4"], "train.global_batch", 2),     # 1 microbatch cannot fill 2 stages
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=12"], "parallel.sequence_parallel", None),
    (["data.train=web@0.7,code"], "data.train", None),                          # a weight missing
    (["data.train=a/web@0.7,b/web@0.3"], "data.train", None),                   # two datasets named 'web'
    (["data.train=[{path: web, weight: 0}]"], "data.train[0].weight", None),
    (["data.train=[{weight: 1}]"], "data.train[0].path", None),
    (["train.profile=5:3"], "train.profile", None),
    (["train.profile=5"], "train.profile", None),
    (["train.lr=nan"], "train.lr", None),
    (["train.lr=inf"], "train.lr", None),
    (["train.lr=.inf"], "train.lr", None),
    (["model.backbone.hidden_size=0"], "model.backbone.hidden_size", None),
    (["model.backbone.intermediate_size=-4"], "model.backbone.intermediate_size", None),
    (["model.backbone.num_layers=0"], "model.backbone.num_layers", None),
    (["model.backbone.num_kv_heads=0"], "model.backbone.num_kv_heads", None),
    (["model.ae.intermediate_size=0"], "model.ae.intermediate_size", None),
    (["model.ae.hidden_size=-1"], "model.ae.hidden_size", None),
]


@pytest.mark.parametrize("overrides,key,world", INVALID, ids=[" ".join(c[0]) for c in INVALID])
def test_invalid_config_is_rejected_naming_its_key(overrides, key, world):
    with pytest.raises(ConfigError) as err:
        cfg = load_config("tiny_calm", CALM + overrides)
        validate(cfg, world_size=world)
    assert err.value.key == key
    assert f"'{key}'" in str(err.value) and "Fix:" in str(err.value)


def test_autoencoder_rejects_model_parallel():
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config("tiny_autoencoder", ["parallel.tp=2"])


def test_unknown_config_name_lists_the_named_ones(tmp_path):
    with pytest.raises(ConfigError, match="tiny_calm"):
        load_config("no_such_config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))


def test_data_train_takes_one_directory_or_a_weighted_mixture():
    from calm_train.config import DataSource, data_sources
    assert load_config("tiny_ar", ["data.train=data/web"]).data.train == "data/web"
    assert data_sources("data/web") == [DataSource("data/web", 1.0, "web")]
    short = load_config("tiny_ar", ["data.train=data/web@0.7,data/code@.3"])
    assert short.data.train == [DataSource("data/web", 0.7), DataSource("data/code", 0.3)]
    listed = load_config("tiny_ar", ["data.train=[{path: data/web, weight: 0.7, name: w}, {path: data/code, weight: 0.3}]"])
    assert [(s.name, s.weight) for s in data_sources(listed.data.train)] == [("w", 0.7), ("code", 0.3)]
    assert config_from_tree(yaml.safe_load(to_yaml(listed))) == listed           # config.yaml round-trips
    assert load_config("tiny_ar", ["data.train=data/v@2"]).data.train == [DataSource("data/v", 2.0)]


def test_an_existing_directory_named_like_a_mixture_is_that_directory(tiny_data, tmp_path, capsys):
    """data.train=/data/web@1 where web@1 is a directory: `calm-train config` shows it trains on that directory;
    with /data/web beside it the string reads both ways and is refused, naming both."""
    from calm_train.cli import main
    from calm_train.config import DataSource
    import shutil
    named = tmp_path / "web@1"
    shutil.copytree(tiny_data, named)
    assert main(["config", "tiny_ar", f"data.train={named}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["train"] == str(named)
    assert load_config("tiny_ar", [f"data.train={tmp_path / 'other'}@1"]).data.train == [
        DataSource(str(tmp_path / "other"), 1.0)]                                # not a path: a mixture
    (tmp_path / "web").mkdir()
    assert main(["config", "tiny_ar", f"data.train={named}"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"reads both as the directory {named} and as the mixture [{tmp_path / 'web'} weight 1]" in line
    listed = load_config("tiny_ar", [f"data.train=[{{path: '{named}'}}]"])   # the unambiguous spelling
    assert listed.data.train == [DataSource(str(named))]


def test_yaml_anchors_and_aliases_are_refused_in_every_file(tmp_path):
    from calm_train.convert.native import CheckpointError, read_yaml
    from calm_train.errors import UserError
    bomb = "base: tiny_ar\na: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(UserError, match=r"bomb.yaml:2:4: not valid YAML \(anchors and aliases"):
        load_config(str(tmp_path / "bomb.yaml"))
    with pytest.raises(CheckpointError, match="anchors and aliases"):
        read_yaml(tmp_path / "bomb.yaml")


def test_profile_steps_are_not_read_as_base_60():
    from calm_train.config import profile_steps
    cfg = load_config("tiny_ar", ["train.profile=10:12"])                        # YAML 1.1 would say 612
    assert cfg.train.profile == "10:12" and profile_steps(cfg.train.profile) == (10, 12)
    assert config_from_tree(yaml.safe_load(to_yaml(cfg))).train.profile == "10:12"


def test_wandb_off_and_yaml_1_1_booleans(tmp_path):
    """`off` is the documented value of logging.wandb (YAML 1.1 would read a boolean); yes/no/on/off still set
    boolean keys."""
    assert load_config("tiny_calm", CALM + ["logging.wandb=off"]).logging.wandb == "off"
    path = tmp_path / "run.yaml"
    path.write_text("base: tiny_calm\nlogging: {wandb: off, progress: off}\nparallel: {sequence_parallel: no}\n")
    cfg = load_config(str(path), CALM)
    assert (cfg.logging.wandb, cfg.logging.progress, cfg.parallel.sequence_parallel) == ("off", False, False)
    assert load_config("tiny_calm", CALM + ["logging.progress=on"]).logging.progress is True


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from calm_train.errors import UserError
    path = tmp_path / "broken.yaml"
    path.write_text("base: tiny_calm\ntrain:\n  steps: 10\n  lr: [1e-3\n")
    with pytest.raises(UserError, match=rf"{path}:5:1: not valid YAML"):
        load_config(str(path), CALM)
    with pytest.raises(UserError, match=r"override 'train.lr=\[1': not valid YAML"):
        load_config("tiny_calm", CALM + ["train.lr=[1"])

"""One typed config tree, loaded from YAML with dotted `key=value` overrides.

`load_config(spec, overrides)` resolves a YAML path or a named config in
`calm_train/configs/` (a YAML may name a `base:` config it extends), applies the
overrides and validates the result before anything else starts.  Every error is a
`ConfigError` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from calm_train.errors import UserError

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


MODEL_KINDS = ("autoencoder", "calm", "ar")


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config key '{key}': {problem}. Fix: {fix}")


@dataclass
class AutoencoderArch:
    """The CALM paper's autoencoder (reference defaults: 512 / 1280 / 2+2 layers / latent 128)."""
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    latent_size: int = 128
    ae_dropout: float = 0.15      # dropout on the latent vector
    mask_prob: float = 0.15       # input tokens masked during training
    kl_clamp: float = 0.5         # per-dimension KL clamped from below
    kl_weight: float = 1e-3
    norm_eps: float = 1e-6


@dataclass
class BackboneArch:
    """Llama-style Transformer backbone (RMSNorm, SwiGLU, RoPE) shared by CALM and AR."""
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int | None = None   # None: multi-head attention (= num_heads)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclass
class EnergyHeadArch:
    """The energy-based generative head and its loss."""
    num_blocks: int = 4               # residual MLP blocks (reference: num_mlp_layers)
    noise_size: int = 64
    num_samples: int = 8              # N model samples per position
    num_target_samples: int = 100     # M samples of the frozen autoencoder's posterior
    beta: float = 1.0


@dataclass
class ModelConfig:
    kind: str = "calm"                # autoencoder | calm | ar
    vocab_size: int | None = None     # None: from the prepared data's dataset.json
    patch_size: int = 4               # K tokens per vector
    attention: str = "auto"           # auto | flash | sdpa
    autoencoder: str | None = None    # frozen AE for calm: run dir, checkpoint dir or HF-layout dir
    init_from: str | None = None      # warm start from these weights: a run, checkpoint or exported/reference dir
    init_from_sha256: str | None = None   # their sha256: recorded by the run; when given, the weights must match
    init_std: float = 0.02
    ae: AutoencoderArch = field(default_factory=AutoencoderArch)
    backbone: BackboneArch = field(default_factory=BackboneArch)
    head: EnergyHeadArch = field(default_factory=EnergyHeadArch)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    ds_config: str | None = None      # a JSON path or a name in ds_configs/; None: chosen from zero_stage/pp
    offload: bool = False             # ZeRO-Offload of optimizer state to CPU


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 1234
    micro_batch: int = 8              # sequences per rank per forward
    global_batch: int = 64            # sequences per optimizer step
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"        # constant | cosine (after warmup)
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 1
    save_every: int = 0               # 0: only at the end and on signals
    eval_every: int = 0               # 0: only at the end
    eval_batches: int = 8             # validation batches per evaluation, over all data-parallel ranks
    eval_samples: int = 2             # CALM: head samples per position of the Brier estimates (U-statistic)
    keep_last: int = 2                # checkpoints kept ...
    keep_every: int = 0               # ... plus every keep_every-th step (0: none)
    max_wallclock: float = 0.0        # seconds per launch (job); then save and exit 75 (0: off)
    max_bad_steps: int = 5            # consecutive non-finite steps before the run stops
    resume_from: str | None = None    # None/"": newest intact checkpoint | scratch | a checkpoint PATH
    lock_timeout: float = 600.0       # seconds without a heartbeat after which RUN_DIR/.lock counts as stale
    peak_flops: float = 0.0           # per-device peak FLOP/s for MFU; 0: the device's spec peak, else measured
    profile: str | None = None        # START:END: torch.profiler trace of those steps (rank 0) in RUN_DIR/profile/
    remote_checkpoints: str | None = None  # s3://BUCKET/PREFIX: every complete checkpoint mirrored there (background)
    async_save: bool = False          # save from a host-memory copy in a background thread; the next save waits


@dataclass
class DataSource:
    """One dataset of a weighted mixture in data.train."""
    path: str                         # prepared data directory (calm-train prepare --out)
    weight: float = 1.0               # share of the samples, relative to the other datasets' weights
    name: str | None = None           # metrics key tokens/<name>; None: the directory's name


@dataclass
class DataConfig:
    # a prepared data directory (calm-train prepare --out), or a weighted mixture of several:
    # [{path: DIR, weight: W}, ...], on the command line DIR_A@0.7,DIR_B@0.3
    train: str | list[DataSource] | None = None
    val: str | None = None            # None: the `val` split of data.train when it has one
    seq_len: int | None = None        # None: from dataset.json
    num_workers: int = 0
    # each dataset may be a URL (s3://BUCKET/PREFIX, gs://, ...): streaming downloads its shards into the cache
    cache_dir: str | None = None      # local shard cache (per job); None: calm_train_data under the system temp dir
    download_retry: int = 2           # streaming: retries of a shard download
    download_timeout: float = 60.0    # streaming: seconds for one shard download
    cache_limit: str | None = None    # streaming: e.g. 10gb; shards beyond it are evicted (None: keep every shard)

    def __post_init__(self):
        if isinstance(self.train, str) and SHORT_MIXTURE.fullmatch(self.train):
            self.train = parse_short_mixture(self.train)


_WEIGHTED = r"[^,]+@(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
SHORT_MIXTURE = re.compile(f"{_WEIGHTED}(?:,{_WEIGHTED})*")     # DIR_A@0.7,DIR_B@0.3


def parse_short_mixture(text: str) -> list[DataSource]:
    """DIR_A@0.7,DIR_B@0.3 -> [DataSource(DIR_A, 0.7), DataSource(DIR_B, 0.3)]."""
    return [DataSource(path, float(weight)) for path, weight in (item.rsplit("@", 1) for item in text.split(","))]


def data_sources(train: str | list[DataSource] | None) -> list[DataSource]:
    """data.train (a directory, the short form or a list) as a list of datasets, each with its name."""
    if not train:
        return []
    if isinstance(train, str):
        items = parse_short_mixture(train) if SHORT_MIXTURE.fullmatch(train) else [DataSource(train)]
    else:
        items = train
    return [DataSource(s.path, s.weight, s.name or pathlib.Path(s.path).name or s.path) for s in items]


@dataclass
class LoggingConfig:
    wandb: str = "off"                # off | offline | online
    project: str = "calm-train"
    progress: bool = True             # a live bar on a terminal, else one line every train.log_every steps
    tensorboard: bool = False         # also write TensorBoard events to RUN_DIR/tensorboard/


@dataclass
class PerfConfig:
    """Speed switches.  None changes the model or the loss; on CPU the defaults run the plain eager path."""
    compile: str = "off"              # off | on: torch.compile of each backbone layer (norm/SwiGLU/RoPE glue) and
                                      # of the energy head + energy loss (results equal eager to rounding)
    fused_adamw: str = "auto"         # auto (on on CUDA) | on | off: torch AdamW(fused=True); never on CPU
    recompute: str = "off"            # off | selective (the MLP of each layer) | full (every layer): activation
                                      # recomputation in backward, to make room for larger micro-batches


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


# ---------------------------------------------------------------------------------------------
# loading


class _YamlLoader(yaml.SafeLoader):
    """YAML as a config means it: booleans are true/false only (YAML 1.1 also reads on/off/yes/no, which would
    turn `logging.wandb=off` or `perf.compile=on` into a bool) and integers have no base 60 (YAML 1.1 reads
    10:12 as 612, so train.profile=10:12 stays a string)."""


_BOOL, _INT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
                                                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))


def resolve_config_path(spec: str) -> pathlib.Path:
    path = pathlib.Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError("CONFIG", f"no file {path}", "pass an existing YAML file or a name "
                              f"among {named_configs()}")
        return path
    named = CONFIG_DIR / f"{spec}.yaml"
    if not named.is_file():
        raise ConfigError("CONFIG", f"'{spec}' is neither a YAML file nor a named config",
                          f"use one of {named_configs()} or a path to a .yaml file")
    return named


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


YAML_1_1_BOOLS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


def _load_yaml(text, where: str):
    """`text` (an open file, or one override's value) as YAML; a syntax error names `where` (a file: with
    line and column)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark and not isinstance(text, str) else where
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{at}: not valid YAML ({problem}). Fix: correct the YAML there (`key: value`, nested "
                        "keys indented by spaces; quote text with ':' or '#')") from err


def _read_yaml_tree(path: pathlib.Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ConfigError("base", f"{path} extends itself through {list(seen)}", "remove the cycle")
    with open(path) as f:
        tree = _load_yaml(f, str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError("CONFIG", f"{path} does not hold a mapping", "write `key: value` YAML")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _deep_merge(_read_yaml_tree(resolve_config_path(base), seen + (path,)), tree)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value", f"write e.g. {item}=VALUE")
        dotted, raw = item.split("=", 1)
        node = tree
        *parents, leaf = dotted.strip().split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = _load_yaml(raw, f"override {item!r}") if raw != "" else None
    return tree


def _build(cls, tree: dict, prefix: str):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(dotted, "unknown key", f"use one of {sorted(names)} under "
                              f"'{prefix[:-1] or '<top level>'}'")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(hint, value, dotted: str):
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(dotted, f"expected a mapping, got {value!r}", "give its keys below it")
        missing = [f.name for f in dataclasses.fields(hint) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in value]
        if missing:
            raise ConfigError(f"{dotted}.{missing[0]}", "is missing", f"give {dotted}.{missing[0]}")
        return _build(hint, value, dotted + ".")
    allowed = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) else [hint]
    if value is None:
        if type(None) in get_args(hint):
            return None
        raise ConfigError(dotted, "must not be empty", f"give a {allowed[0].__name__}")
    if isinstance(value, str) and (float in allowed or int in allowed):
        value = _number(value)                # YAML 1.1 reads 3e-4 (no dot) as a string
    if isinstance(value, str) and bool in allowed and value.lower() in YAML_1_1_BOOLS:
        value = YAML_1_1_BOOLS[value.lower()]  # yes/no/on/off still mean true/false for a boolean key
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(dotted, f"{value} is not a finite number", "give a finite value")
    for typ in allowed:
        if get_origin(typ) is list and isinstance(value, list):
            return [_coerce(get_args(typ)[0], item, f"{dotted}[{n}]") for n, item in enumerate(value)]
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if typ is bool and isinstance(value, bool):
            return value
        if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(dotted, f"expected {' or '.join(getattr(t, '__name__', str(t)) for t in allowed)}, got {value!r}",
                      "give a value of that type")


def _number(text: str):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def config_from_tree(tree: dict) -> Config:
    return _build(Config, tree, "")


def load_config(spec: str, overrides: list[str] = (), validate_now: bool = True) -> Config:
    tree = _deep_merge(_read_yaml_tree(resolve_config_path(spec)), parse_overrides(list(overrides)))
    cfg = config_from_tree(tree)
    if validate_now:
        validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# validation


def _check(ok: bool, key: str, problem: str, fix: str):
    if not ok:
        raise ConfigError(key, problem, fix)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Reject a config that cannot run, naming the key and the fix. `world_size` adds layout checks."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    _check(bool(cfg.run_dir), "run_dir", "is empty", "set run_dir=DIR")
    _check(m.kind in MODEL_KINDS, "model.kind", f"'{m.kind}' is not a model kind",
           f"use one of {list(MODEL_KINDS)}")
    _check(m.patch_size >= 1, "model.patch_size", f"K={m.patch_size} must be >= 1", "use K=4 as the paper")
    _check(m.attention in ("auto", "flash", "sdpa"), "model.attention", f"'{m.attention}' is unknown",
           "use auto, flash or sdpa")
    _check(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size", f"{m.vocab_size} is too small",
           "leave it empty to take it from dataset.json")
    _check(m.init_std > 0, "model.init_std", "must be > 0", "use 0.02")
    if d.seq_len is not None:
        _check(d.seq_len > 0 and d.seq_len % m.patch_size == 0, "data.seq_len",
               f"{d.seq_len} is not a positive multiple of model.patch_size={m.patch_size}",
               f"use a multiple of {m.patch_size}, e.g. {max(1, (d.seq_len or 0) // m.patch_size) * m.patch_size}")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0", "use 0 or more loader workers")
    _check(d.download_retry >= 0 and d.download_timeout > 0, "data.download_timeout",
           f"download_retry={d.download_retry} must be >= 0 and download_timeout={d.download_timeout} > 0",
           "use the defaults (2 retries, 60 s)")
    _validate_mixture(d.train)
    _validate_urls(cfg)

    sizes = {"model.ae.hidden_size": m.ae.hidden_size, "model.ae.intermediate_size": m.ae.intermediate_size,
             "model.ae.latent_size": m.ae.latent_size}
    if m.kind in ("calm", "ar"):
        b = m.backbone
        sizes.update({"model.backbone.hidden_size": b.hidden_size, "model.backbone.intermediate_size":
                      b.intermediate_size, "model.backbone.num_layers": b.num_layers,
                      "model.backbone.num_heads": b.num_heads, "model.backbone.num_kv_heads": 1 if b.num_kv_heads is None else b.num_kv_heads})
    for key, size in sizes.items():
        _check(size >= 1, key, f"{size} must be >= 1", "give a positive size (see calm_train/configs for examples)")
    for key, value in (("model.ae.norm_eps", m.ae.norm_eps), ("model.backbone.norm_eps", m.backbone.norm_eps),
                       ("model.backbone.rope_theta", m.backbone.rope_theta)):
        _check(value > 0, key, f"{value} must be > 0", "use the default (norm_eps 1e-6, rope_theta 10000)")

    ae = m.ae
    _check(ae.num_encoder_layers >= 2 and ae.num_decoder_layers >= 2, "model.ae.num_encoder_layers",
           "the encoder and decoder need >= 2 layers each (half before, half after the K-merge)",
           "use 2 or more")
    _check(ae.latent_size >= 1 and ae.hidden_size >= 1, "model.ae.latent_size", "must be >= 1",
           "use 128 as the paper")
    _check(0.0 <= ae.ae_dropout < 1.0, "model.ae.ae_dropout", f"{ae.ae_dropout} not in [0, 1)", "use 0.15")
    _check(0.0 <= ae.mask_prob < 1.0, "model.ae.mask_prob", f"{ae.mask_prob} not in [0, 1)", "use 0.15")
    _check(ae.kl_clamp >= 0 and ae.kl_weight >= 0, "model.ae.kl_clamp", "must be >= 0",
           "use kl_clamp=0.5, kl_weight=1e-3")

    if m.kind in ("calm", "ar"):
        b = m.backbone
        _check(b.num_heads >= 1 and b.hidden_size % b.num_heads == 0, "model.backbone.num_heads",
               f"hidden_size={b.hidden_size} is not divisible by num_heads={b.num_heads}",
               "choose num_heads dividing hidden_size")
        _check(b.num_heads % b.kv_heads == 0, "model.backbone.num_kv_heads",
               f"num_heads={b.num_heads} is not a multiple of num_kv_heads={b.kv_heads}",
               "choose num_kv_heads dividing num_heads")
        _check((b.hidden_size // b.num_heads) % 2 == 0, "model.backbone.num_heads",
               "RoPE needs an even head dimension", "choose num_heads so hidden_size/num_heads is even")
        _check(p.tp >= 1 and b.num_heads % p.tp == 0, "parallel.tp",
               f"tp={p.tp} does not divide model.backbone.num_heads={b.num_heads}",
               "choose tp dividing the number of attention heads")
        _check(b.kv_heads % p.tp == 0, "parallel.tp",
               f"tp={p.tp} does not divide model.backbone.num_kv_heads={b.kv_heads}",
               "choose tp dividing the number of key/value heads")
        _check(b.intermediate_size % p.tp == 0, "parallel.tp",
               f"tp={p.tp} does not divide model.backbone.intermediate_size={b.intermediate_size}",
               "choose tp dividing the MLP width")
        _check(m.vocab_size is None or m.vocab_size % p.tp == 0, "parallel.tp",
               f"tp={p.tp} does not divide model.vocab_size={m.vocab_size} (the embedding is split by vocabulary)",
               "choose tp dividing the vocabulary size, or prepare data with a vocabulary divisible by tp")
        _check(p.pp >= 1 and b.num_layers % p.pp == 0, "parallel.pp",
               f"pp={p.pp} does not divide model.backbone.num_layers={b.num_layers}",
               "choose pp dividing the number of layers")
    else:
        _check(p.tp == 1 and p.pp == 1, "parallel.tp", "the autoencoder trains data-parallel only",
               "set parallel.tp=1 parallel.pp=1 (scale it with data parallelism)")
    if m.kind == "calm":
        h = m.head
        _check(bool(m.autoencoder or m.init_from), "model.autoencoder", "a CALM run needs its frozen autoencoder",
               "set model.autoencoder=RUN_DIR (or a checkpoint or exported directory) of a trained autoencoder, "
               "or model.init_from=a CALM directory that carries one")
        _check(h.num_samples >= 2, "model.head.num_samples",
               f"N={h.num_samples}: the energy score needs >= 2 model samples", "use N=8")
        _check(h.num_target_samples >= 1, "model.head.num_target_samples", "must be >= 1", "use M=100")
        _check(0 < h.beta < 2, "model.head.beta", f"beta={h.beta} is not in (0, 2): the score is not "
               "strictly proper", "use beta=1")
        _check(h.num_blocks >= 1 and h.noise_size >= 1, "model.head.num_blocks", "must be >= 1", "use 4")

    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"{p.zero_stage} is not a ZeRO stage",
           "use 0, 1, 2 or 3")
    _check(not (p.pp > 1 and p.zero_stage > 1), "parallel.zero_stage",
           f"ZeRO-{p.zero_stage} does not work with pipeline parallelism (pp={p.pp})",
           "use parallel.zero_stage=1 (or 0) with pp > 1")
    _check(not (p.sequence_parallel and p.tp == 1), "parallel.sequence_parallel",
           "sequence parallelism splits activations over tensor-parallel ranks, but tp=1",
           "set parallel.tp >= 2 or parallel.sequence_parallel=false")
    if p.sequence_parallel and d.seq_len is not None:
        positions = d.seq_len // m.patch_size if m.kind == "calm" else d.seq_len
        _check(positions % p.tp == 0, "parallel.sequence_parallel",
               f"{positions} backbone positions are not divisible by tp={p.tp}",
               "choose data.seq_len so the positions divide by tp, or turn sequence_parallel off")
    _check(not (p.offload and p.zero_stage == 0), "parallel.offload", "offload needs ZeRO >= 1",
           "set parallel.zero_stage to 1, 2 or 3")

    _check(t.steps >= 1, "train.steps", f"{t.steps} must be >= 1", "train for at least one step")
    _check(t.lr > 0 and t.min_lr >= 0, "train.lr", f"lr={t.lr} must be > 0", "use 3e-4 as the paper")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", "use 0 or more")
    _check(t.schedule in ("constant", "cosine"), "train.schedule", f"'{t.schedule}' is unknown",
           "use constant or cosine")
    _check(t.micro_batch >= 1, "train.micro_batch", "must be >= 1", "use 1 or more sequences")
    _check(t.global_batch >= t.micro_batch and t.global_batch % t.micro_batch == 0, "train.global_batch",
           f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}",
           "make global_batch = micro_batch x data-parallel size x accumulation steps")
    _check(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"'{t.dtype}' is unknown", "use auto, fp32 or bf16")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0", "use 1.0 (0 turns clipping off)")
    _check(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta2", "betas must be in [0, 1)",
           "use 0.9 and 0.95")
    for key in ("log_every", "save_every", "eval_every", "keep_every"):
        _check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0", "use 0 (off) or a step count")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1", "log every step or every few steps")
    _check(t.keep_last >= 1, "train.keep_last", "must keep at least the newest checkpoint", "use 1 or more")
    _check(t.eval_batches >= 1, "train.eval_batches", "must be >= 1", "evaluate at least one batch")
    _check(t.eval_samples >= 2, "train.eval_samples", f"{t.eval_samples}: the Brier estimates need >= 2 samples "
           "per position", "use 2 (the two-sample estimate) or more, e.g. 16")
    if t.profile is not None:
        _check(profile_steps(t.profile) is not None, "train.profile", f"'{t.profile}' is not START:END with "
               "1 <= START <= END", "write e.g. train.profile=10:12 (steps 10 to 12, counted from 1)")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1", "allow a few skipped steps, e.g. 5")
    _check(t.lock_timeout > 0, "train.lock_timeout", f"{t.lock_timeout} must be > 0",
           "use 600 (seconds without a heartbeat before another launch may take over the run directory)")
    _check(cfg.logging.wandb in ("off", "offline", "online"), "logging.wandb",
           f"'{cfg.logging.wandb}' is unknown", "use off, offline or online")
    f = cfg.perf
    _check(f.compile in ("off", "on"), "perf.compile", f"'{f.compile}' is unknown", "use off or on")
    _check(f.fused_adamw in ("auto", "on", "off"), "perf.fused_adamw", f"'{f.fused_adamw}' is unknown",
           "use auto (fused on CUDA), on or off")
    _check(f.recompute in ("off", "selective", "full"), "perf.recompute", f"'{f.recompute}' is unknown",
           "use off, selective (MLP) or full (every layer)")
    _check(not (f.compile == "on" and p.zero_stage == 3), "perf.compile",
           "ZeRO-3 gathers parameters in module hooks, which torch.compile is not run with here",
           "use parallel.zero_stage <= 2 with perf.compile=on, or perf.compile=off")

    if world_size is not None:
        validate_layout(cfg, world_size)


def profile_steps(spec: str | None) -> tuple[int, int] | None:
    """train.profile `START:END` as (START, END), or None when it is not of that form."""
    match = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", spec or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        return None
    return int(match[1]), int(match[2])


def _validate_mixture(train) -> None:
    short_form = "write data.train=DIR, or DIR_A@0.7,DIR_B@0.3, or a YAML list of {path: DIR, weight: W}"
    if isinstance(train, str):
        _check(not ("," in train and "@" in train), "data.train", f"'{train}' is neither one directory nor "
               "a list DIR@WEIGHT,DIR@WEIGHT with numeric weights", short_form)
        return
    if train is None:
        return
    _check(len(train) >= 1, "data.train", "the mixture lists no dataset", short_form)
    for n, source in enumerate(train):
        _check(bool(source.path), f"data.train[{n}].path", "is empty", "give the prepared data directory")
        _check(math.isfinite(source.weight) and source.weight > 0, f"data.train[{n}].weight",
               f"{source.weight} is not a positive number", "give every dataset a weight > 0 (weights are relative)")
    seen: dict[str, str] = {}
    for source in data_sources(train):
        _check(source.name not in seen, "data.train", f"two datasets are named '{source.name}' ({seen.get(source.name)} "
               f"and {source.path}); the name keys the metrics tokens/<name>",
               "give each a distinct `name:` in the YAML list form, or rename a directory")
        seen[source.name] = source.path


def _validate_urls(cfg: Config) -> None:
    """A URL where a local directory is needed, or one that no installed client reads, names the key (storage/url.py)."""
    from calm_train.storage.url import is_url, local_only, require_client
    local_only(cfg.run_dir, "config key 'run_dir':", "set run_dir=DIR (local or a shared file system) and "
               "train.remote_checkpoints=URL to mirror its checkpoints to the bucket")
    local_only(cfg.data.cache_dir, "config key 'data.cache_dir':", "give a local directory for the shard cache")
    train = [s.path for s in data_sources(cfg.data.train)] if cfg.data.train else []
    for key, value in ([("data.train", path) for path in train] + [("data.val", cfg.data.val),
                       ("model.autoencoder", cfg.model.autoencoder), ("model.init_from", cfg.model.init_from),
                       ("train.resume_from", cfg.train.resume_from)]):
        if is_url(value):
            require_client(value, f"config key '{key}':")
    remote = cfg.train.remote_checkpoints
    if remote:
        _check(is_url(remote), "train.remote_checkpoints", f"'{remote}' is not an object-store URL",
               "give s3://BUCKET/PREFIX (the run directory itself holds the local checkpoints)")
        require_client(remote, "config key 'train.remote_checkpoints':", write=True)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


def validate_layout(cfg: Config, world_size: int) -> None:
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp
    _check(world_size % model_parallel == 0, "parallel.tp",
           f"tp x pp = {model_parallel} does not divide the {world_size} launched processes",
           f"launch a multiple of {model_parallel} processes or change parallel.tp/parallel.pp")
    dp = data_parallel_size(cfg, world_size)
    per_step = t.micro_batch * dp
    _check(t.global_batch % per_step == 0, "train.global_batch",
           f"{t.global_batch} is not divisible by micro_batch x dp = {t.micro_batch} x {dp}",
           f"use a multiple of {per_step}")
    if p.pp > 1:
        microbatches = t.global_batch // per_step
        _check(microbatches >= p.pp, "train.global_batch",
               f"{microbatches} microbatches per step cannot fill {p.pp} pipeline stages",
               f"raise global_batch to >= {per_step * p.pp} or lower micro_batch")

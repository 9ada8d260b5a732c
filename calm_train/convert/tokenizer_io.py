"""The tokenizer beside converted weights: a `transformers` tokenizer on export, our tokenizer/ on import.

Export writes what `AutoTokenizer.from_pretrained(dir)` loads as a `PreTrainedTokenizerFast`:
tokenizer.json (a tiktoken BPE file is converted with `transformers`' TikTokenConverter), plus
tokenizer_config.json and special_tokens_map.json naming BOS/EOS/PAD, `model_max_length` = the
trained context, and `model_input_names` = input_ids, attention_mask (no token_type_ids, which
`LlamaForCausalLM.generate(**tok(text, return_tensors="pt"))` would reject).  The export is checked: the
converted tokenizer must give our ids on a probe text and keep every special token's id.

Import copies the tokenizer files into the checkpoint's tokenizer/ and writes the dataset.json
record that `eval` / `generate` read it through.
"""
from __future__ import annotations

import json
import pathlib
import shutil

from calm_train.convert.weights import ConvertError
from calm_train.data.tokenizer import PROBE, Tokenizer, load_dataset_tokenizer, load_tokenizer
from calm_train.files import sha256_file

IMPORTED_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _fast_tokenizer(tok: Tokenizer, tokenizer_dir: pathlib.Path):
    from tokenizers import Tokenizer as HFTokenizer
    if "tokenizer.json" in tok.files:
        return HFTokenizer.from_str(tok.files["tokenizer.json"].decode("utf-8"))
    from transformers.convert_slow_tokenizer import TikTokenConverter
    pattern = json.loads(tok.files["tokenizer_config.json"])["pat_str"]
    names = [name for name, _ in sorted(tok.special.items(), key=lambda kv: kv[1])]
    return TikTokenConverter(vocab_file=str(tokenizer_dir / tok.main), pattern=pattern,
                             additional_special_tokens=names).converted()


MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")   # the main file of a directory: the first present


def tokenizer_identity(directory) -> str | None:
    """The sha256 that identifies the tokenizer a model directory holds, as `tokenizer_sha256` in dataset.json
    does for prepared data: its dataset.json's record (a run's tokenizer/, prepared data); else, in an exported
    or foreign directory, the identity our export recorded in config.json while the main file is the one it
    wrote (a Hugging Face tokenizer.json re-serialises the same ids in other bytes), or the main file's sha256;
    None: no tokenizer file."""
    from calm_train.data.dataset_info import INFO_NAME, read_dataset_info
    directory = pathlib.Path(directory)
    if (directory / INFO_NAME).is_file():
        return read_dataset_info(directory).tokenizer_sha256
    main = next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)
    if main is None:
        return None
    digest = sha256_file(main)
    config = directory / "config.json"
    record = json.loads(config.read_text()) if config.is_file() else {}
    if isinstance(record, dict) and record.get("tokenizer_file_sha256") == digest and record.get("tokenizer_sha256"):
        return str(record["tokenizer_sha256"])
    return digest


def export_tokenizer(tokenizer_dir: pathlib.Path, dst: pathlib.Path, max_length: int) -> dict[str, int | None]:
    """Write a `transformers` tokenizer into dst (model_max_length = max_length tokens); returns bos/eos/pad ids
    for config.json."""
    from transformers import PreTrainedTokenizerFast
    tok = load_dataset_tokenizer(tokenizer_dir)
    name = {i: s for s, i in tok.special.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=_fast_tokenizer(tok, tokenizer_dir), eos_token=name[tok.eos_id],
                                   pad_token=name.get(tok.pad_id), bos_token=name.get(tok.bos_id),
                                   model_max_length=max_length, model_input_names=MODEL_INPUT_NAMES)
    wrong = {s: fast.convert_tokens_to_ids(s) for s, i in tok.special.items() if fast.convert_tokens_to_ids(s) != i}
    if wrong or fast.backend_tokenizer.encode(PROBE, add_special_tokens=False).ids != tok.encode(PROBE):
        raise ConvertError(f"{tokenizer_dir}: the converted Hugging Face tokenizer does not reproduce ours (special "
                           f"token ids moved: {dict(list(wrong.items())[:3])}). Fix: export from a tokenizer.json, "
                           "or a tiktoken file whose special tokens follow its ranks without gaps")
    fast.save_pretrained(str(dst))
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def tokenizer_record(tokenizer_dir: pathlib.Path, dst: pathlib.Path) -> dict[str, str]:
    """The config.json fields by which `tokenizer_identity` of the export is the native tokenizer's."""
    return {"tokenizer_sha256": tokenizer_identity(tokenizer_dir),
            "tokenizer_file_sha256": sha256_file(dst / "tokenizer.json")}


def import_tokenizer(src: pathlib.Path, dst_dir: pathlib.Path, vocab_size: int, patch_size: int,
                     seq_len: int) -> Tokenizer:
    """Copy src's tokenizer files into dst_dir and write its dataset.json; the tokenizer must fit the vocabulary."""
    from calm_train.data.dataset_info import DatasetInfo, write_dataset_info
    main = next((src / n for n in TOKENIZER_FILES if (src / n).is_file()), None)
    if main is None:
        raise ConvertError(f"{src} holds no tokenizer.json or tokenizer.model: a native checkpoint carries its "
                           "tokenizer. Fix: put the model's tokenizer files (tokenizer.json and "
                           "tokenizer_config.json) beside config.json")
    dst_dir.mkdir(parents=True)
    files = [main.name] + [n for n in IMPORTED_FILES if (src / n).is_file()]
    for name in files:
        shutil.copy2(src / name, dst_dir / name)
    try:
        tok = load_tokenizer(dst_dir / main.name)
    except (ValueError, OSError) as err:
        raise ConvertError(f"{main}: cannot be read as a tokenizer ({err})") from err
    if tok.vocab_size > vocab_size:
        raise ConvertError(f"{main}: the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                           f"{vocab_size}. Fix: convert with the tokenizer the model was trained with")
    write_dataset_info(dst_dir, DatasetInfo(
        vocab_size=vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id, patch_size=patch_size,
        seq_len=seq_len, tokenizer=main.name, tokenizer_sha256=tokenizer_identity(src), tokenizer_files=files, splits={},
        documents=0, text_bytes=0, samples_per_shard=0, val_fraction=0.0, inputs=[f"converted from {src}"]))
    return tok

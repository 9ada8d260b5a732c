"""URLs are never local paths: each is read by an installed client or refused in one line, before any work."""
import os

import pytest

from calm_train.cli import main
from calm_train.config import load_config
from calm_train.errors import UserError
from calm_train.storage.url import child, is_url, name, require_client


def test_url_parts():
    assert is_url("s3://b/p") and is_url("gs://b") and not is_url("data/s3:/b") and not is_url("C:\\data")
    assert child("s3://b/p/", "train", "index.json") == "s3://b/p/train/index.json"
    assert child("data", "train") == os.path.join("data", "train")
    assert name("s3://b/data/more/") == "more" and name("runs/x") == "x"


@pytest.mark.parametrize("override, says", [
    ("run_dir=s3://b/run", "config key 'run_dir': s3://b/run is a URL; a local directory is needed here. Fix: set "
                           "run_dir=DIR"),
    ("data.train=ftp://host/data", "config key 'data.train': ftp://host/data: no client reads ftp:// URLs"),
    ("data.train=dbfs://vol/data", "the dbfs:// client (databricks.sdk) is not installed. Fix: pip install "
                                   "databricks-sdk"),
    ("train.remote_checkpoints=gs://b/run", "calm-train writes and lists objects (prepare --out, checkpoints) at "
                                            "s3:// only"),
    ("train.remote_checkpoints=runs/mirror", "'runs/mirror' is not an object-store URL"),
    ("data.cache_dir=s3://b/cache", "config key 'data.cache_dir': s3://b/cache is a URL"),
])
def test_config_refuses_urls_it_cannot_use(override, says):
    with pytest.raises(UserError) as err:
        load_config("tiny_ar", ["data.train=data/x", override])
    assert says in str(err.value) and "Fix:" in str(err.value)


def test_commands_refuse_an_unreadable_scheme_and_write_nothing_locally(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["prepare", "--input", "x.jsonl", "--tokenizer", "train:300", "--out", "nope://bucket/data"],
                 ["verify-data", "nope://bucket/data"], ["convert", "runs/x", "s3://bucket/out", "--to", "hf"]):
        assert main(argv) == 1
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"calm-train {argv[0]}: error: ") and "Fix:" in line, line
    assert list(tmp_path.iterdir()) == []            # no ./nope:/ nor ./s3:/ directory


def test_every_known_scheme_with_its_client_installed_is_accepted():
    require_client("s3://b/p", "data")
    require_client("gs://b/p", "data")              # streaming reads it (google-cloud-storage is its dependency)
    with pytest.raises(UserError, match="writes and lists objects"):
        require_client("gs://b/p", "--out", write=True)

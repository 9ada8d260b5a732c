"""Prepared data in a bucket (on the session's real S3 server): `prepare --out URL` uploads the same files a
local prepare writes (dataset.json last: a cut upload is never taken), `verify-data URL` checks every shard,
and a URL that cannot be read is one line naming it."""
import json
import os
import subprocess
import sys
import time

from calm_train.cli import main
from faults import FaultProxy


def files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(capsys, command: str) -> str:
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"calm-train {command}: error: ") and "Fix:" in line, line
    return line


def test_prepare_to_a_bucket_uploads_the_same_data_and_verify_data_reads_it(s3, bucket, tiny_corpus, tiny_data,
                                                                            tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"{bucket}/tiny"
    assert main(["prepare", "--input", str(tiny_corpus), "--tokenizer", str(tiny_data / "tokenizer.json"), "--out",
                 url, "--seq-len", "32", "--patch-size", "4", "--val-fraction", "0.1"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == url
    assert list(tmp_path.iterdir()) == []                    # staged in the cache, nothing left in the working dir
    local = files(tiny_data)
    client = s3.client()
    remote = {key: client.get_object(Bucket=bucket[5:], Key=f"tiny/{key}")["Body"].read() for key in s3.keys(url)}
    assert remote.keys() == local.keys()
    # the same data uploaded is the same data: tokenizer, its sha256 in dataset.json and every shard byte for byte
    assert {k: v for k, v in remote.items() if k != "dataset.json"} == {k: v for k, v in local.items()
                                                                          if k != "dataset.json"}
    ours, theirs = json.loads(local["dataset.json"]), json.loads(remote["dataset.json"])
    assert theirs["tokenizer_sha256"] == ours["tokenizer_sha256"] and theirs["splits"] == ours["splits"]

    assert main(["verify-data", url]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {url}: train ")
    shard = next(k for k in remote if k.startswith("train/") and k.endswith(".zstd"))
    flipped = bytearray(remote[shard])
    flipped[len(flipped) // 2] ^= 0xFF
    client.put_object(Bucket=bucket[5:], Key=f"tiny/{shard}", Body=bytes(flipped))
    assert main(["verify-data", url]) == 1
    assert f"{url}/{shard}: xxh64 checksum mismatch" in error_line(capsys, "verify-data")
    client.delete_object(Bucket=bucket[5:], Key=f"tiny/{shard}")
    assert main(["verify-data", url]) == 1
    assert f"{url}/{shard}: shard object missing" in error_line(capsys, "verify-data")

    client.put_object(Bucket=bucket[5:], Key="tiny/notes.txt", Body=b"mine")
    assert main(["prepare", "--input", str(tiny_corpus), "--tokenizer", str(tiny_data / "tokenizer.json"), "--out",
                 url, "--seq-len", "32", "--patch-size", "4"]) == 1
    assert "holds objects that are not prepared data (['notes.txt'])" in error_line(capsys, "prepare")
    assert "notes.txt" in s3.keys(url) and "dataset.json" in s3.keys(url)     # nothing was deleted


def test_prepare_killed_during_its_upload_leaves_no_dataset_and_a_rerun_completes(s3, bucket, tiny_corpus, tiny_data,
                                                                                 tmp_path, capsys):
    """kill -9 while the upload hangs just before dataset.json: the prefix holds shards but is not a dataset
    (verify-data says so in one line), and the next prepare of the same URL replaces it and finishes."""
    url = f"{bucket}/cut"
    proxy = FaultProxy(s3.endpoint)
    proxy.arm("hold", r"PUT /[^ ]*/cut/dataset\.json ")
    args = ["prepare", "--input", str(tiny_corpus), "--tokenizer", str(tiny_data / "tokenizer.json"), "--out", url,
            "--seq-len", "32", "--patch-size", "4", "--val-fraction", "0.1"]
    proc = subprocess.Popen([sys.executable, "-m", "calm_train", *args], env={**os.environ,
                            "S3_ENDPOINT_URL": proxy.endpoint}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proxy.triggered.wait(120), proc.stderr.read() if proc.poll() is not None else "no dataset.json PUT"
    finally:
        proc.kill()
        proc.wait(60)
        proxy.close()
    left = s3.keys(url)
    assert "dataset.json" not in left and any(k.endswith(".zstd") for k in left)
    assert main(["verify-data", url]) == 1
    line = error_line(capsys, "verify-data")
    assert f"{url}/dataset.json: missing; " in line and "upload did not finish" in line
    started = time.monotonic()
    assert main(args) == 0 and time.monotonic() - started < 60
    assert main(["verify-data", url]) == 0

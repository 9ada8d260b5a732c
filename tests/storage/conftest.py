"""Fixtures of the object-storage tests: buckets on the session's S3 server (tests/conftest.py `s3`), prepared
data in a bucket, and the launch helpers of tests/train/runs.py."""
import itertools
import json
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent / "train")]
_numbers = itertools.count()


def topic_docs(start: int, stop: int) -> list[str]:
    from pydoc_data import topics
    return [topics.topics[name] for name in sorted(topics.topics)][start:stop]


@pytest.fixture
def bucket(s3, request) -> str:
    """A new, empty bucket for one test: s3://NAME."""
    return s3.bucket(f"calm-{next(_numbers)}-{request.node.name[:30].lower().replace('_', '-').strip('-')}")


@pytest.fixture(scope="session")
def remote_more(s3, tiny_data, tmp_path_factory) -> str:
    """Other documents than tiny_data's, prepared with its tokenizer, K and seq-len straight into a bucket."""
    from calm_train.cli import main
    root = tmp_path_factory.mktemp("more")
    (root / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in topic_docs(60, 120)))
    url = f"{s3.bucket('calm-data')}/more"
    assert main(["prepare", "--input", str(root / "more.jsonl"), "--tokenizer", str(tiny_data / "tokenizer.json"),
                 "--out", url, "--seq-len", "32", "--patch-size", "4", "--val-fraction", "0.1"]) == 0
    return url

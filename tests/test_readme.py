"""The README's quick shell blocks run as written (in a scratch copy of the working directory's layout).

A block is quick when the line before its opening fence is `<!-- quick -->`, or `<!-- quick s3 -->` for one that
reads and writes a bucket: the test then starts the session's S3-compatible server on 127.0.0.1 (tests/conftest.py
`s3`), creates the bucket `calm-quick` and puts its endpoint and credentials into the environment, as a user's
client configuration would. The blocks run in order in one bash session, in a temporary directory, with the
project's venv first on PATH and `set -e`."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = re.compile(r"<!-- quick( s3)? -->\n```bash\n(.*?)```", re.S)
BUCKET = "calm-quick"


def quick_blocks() -> list[tuple[bool, str]]:
    """(needs the S3 server, the block's text) of every quick block, in order."""
    return [(bool(s3), block) for s3, block in QUICK.findall((REPO / "README.md").read_text())]


def test_readme_has_quick_blocks():
    assert len(quick_blocks()) >= 2


@pytest.mark.timeout(900)        # the blocks' own limit below, above the suite's default
def test_readme_quick_blocks_run_as_written(tmp_path, request):
    blocks = quick_blocks()
    script = "set -euo pipefail\n" + "\n".join(block for _, block in blocks)
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
               CALM_TRAIN_REPO=str(REPO))
    if any(needs for needs, _ in blocks):
        server = request.getfixturevalue("s3")
        server.bucket(BUCKET)
        env.update(server.env)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README quick blocks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

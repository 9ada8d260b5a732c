"""The README's quick shell blocks run as written (in a scratch copy of the working directory's layout).

A block is quick when the line before its opening fence is `<!-- quick -->`. The blocks run in order in
one bash session, in a temporary directory, with the project's venv first on PATH and `set -e`."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = re.compile(r"<!-- quick -->\n```bash\n(.*?)```", re.S)


def quick_blocks() -> list[str]:
    return QUICK.findall((REPO / "README.md").read_text())


def test_readme_has_quick_blocks():
    assert len(quick_blocks()) >= 2


@pytest.mark.timeout(900)        # the blocks' own limit below, above the suite's default
def test_readme_quick_blocks_run_as_written(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(quick_blocks())
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
               CALM_TRAIN_REPO=str(REPO))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README quick blocks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

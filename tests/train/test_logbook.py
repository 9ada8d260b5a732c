"""History files (train/logbook.py): every line a JSON object; a damaged one is one line naming the file and line."""
import re

import pytest

from calm_train.errors import UserError
from calm_train.train.logbook import read_jsonl, truncate_after


@pytest.mark.parametrize("line", ["null", "[1, 2]", "7"])
def test_a_line_that_is_not_an_object_is_named(tmp_path, line):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n' + line + '\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(UserError, match=re.escape(f"eval.jsonl:2 is '{line}', not a JSON object. Fix: repair")):
        truncate_after(path, 1)
    path.write_text('{"step": 1}\n' + line + "\n")                  # the last line, complete: not torn either
    with pytest.raises(UserError, match="eval.jsonl:2"):
        read_jsonl(path)

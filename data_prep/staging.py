"""Where prepare writes, so that it never destroys data.

Everything is written into a staging directory beside --out; the finished output replaces --out at
the end by two renames (the previous output aside, the new one in place), and only then is the
previous output deleted.  A kill at any moment leaves --out holding the previous output or the new,
complete one; a kill between the two renames is finished by the next prepare of that --out.

    PARENT/.NAME.prepare/.work/task-I-of-N/   array tasks' token streams (until the merge)
    PARENT/.NAME.prepare/new/                 the output being written
    PARENT/.NAME.prepare/old/                 the previous output, while the new one is swapped in
    PARENT/NAME.before-prepare-UTC/           a foreign --out moved aside by --overwrite (kept)
    PARENT/.NAME.prepare.lock                 the staging area's lock (kept: a lock file deleted while held
                                              would let a third prepare lock a new file beside the holder)

The lock is a kernel file lock (flock), so it is released when its holder exits, however it exits: a prepare
that writes the whole output, a --merge and a --tokenizer-only hold it alone; the tasks of an array job share
it (each writes only its own .work/task-I-of-N); a second prepare of one --out is refused while it is held.

--out may be absent, empty, or a previous prepare output: prepared data (dataset.json, the tokenizer
files it names, the split directories) or a tokenizer of --tokenizer-only.  Anything else (a user's
files) is refused unless --overwrite, which moves it aside instead of deleting it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil

from calm_train.data.dataset_info import INFO_NAME, DataError, read_dataset_info
from calm_train.files import move_aside

TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer.model", "tokenizer_config.json"})
SPLITS = frozenset({"train", "val"})


def output_kind(out: pathlib.Path) -> str:
    """'absent', 'empty', 'data' (prepared data), 'tokenizer' (--tokenizer-only) or 'foreign'."""
    if not out.exists() and not out.is_symlink():
        return "absent"
    if not out.is_dir():
        return "foreign"
    entries = set(os.listdir(out))
    if not entries:
        return "empty"
    if INFO_NAME in entries:
        try:
            info = read_dataset_info(out)
        except DataError:
            return "foreign"
        language = {info.language} if info.language else set()
        return "data" if entries <= {INFO_NAME, *info.tokenizer_files, *language, *SPLITS} else "foreign"
    return "tokenizer" if entries <= TOKENIZER_FILES else "foreign"


class Staging:
    """The staging area of one --out (shared by the tasks of an array job and their merge)."""

    def __init__(self, out):
        self.out = pathlib.Path(out).absolute()
        self.root = self.out.parent / f".{self.out.name}.prepare"
        self.new, self.old = self.root / "new", self.root / "old"

    @contextlib.contextmanager
    def locked(self, exclusive: bool):
        """Hold the staging area's lock (alone, or `exclusive=False`: shared with the other tasks of an array)."""
        path = self.out.parent / f".{self.out.name}.prepare.lock"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            try:
                fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(f"--out {self.out}: another prepare of it is running (it holds {path}). Fix: wait "
                                "for it to finish, or prepare into another --out") from None
            yield

    def recover(self) -> None:
        """Finish a swap that a kill interrupted (`old` exists only while a complete `new` is swapped in)."""
        if not self.old.exists():
            return
        if not self.out.exists() and self.new.is_dir():
            os.rename(self.new, self.out)
        if not self.out.exists():
            os.rename(self.old, self.out)
        shutil.rmtree(self.old)

    def check(self, overwrite: bool, tokenizer_only: bool = False) -> None:
        """Refuse an --out that prepare may not replace (before any work starts)."""
        kind = output_kind(self.out)
        if kind == "foreign" and not overwrite:
            found = sorted(os.listdir(self.out))[:5] if self.out.is_dir() else "a file"
            raise DataError(f"--out {self.out} is not empty and is not the output of a previous prepare (it holds "
                            f"{found}). Fix: choose a new or empty --out, or pass --overwrite to move it aside to "
                            f"{self.out.name}.before-prepare-<time> (kept) and write there")
        if kind == "data" and tokenizer_only and not overwrite:
            raise DataError(f"--out {self.out} holds prepared data, which --tokenizer-only would replace by a "
                            "tokenizer before the new data exists. Fix: write the tokenizer to another directory "
                            "(--out DIR-tokenizer) and pass it to the tasks with --tokenizer")

    def clear_work(self) -> None:
        shutil.rmtree(self.root / ".work", ignore_errors=True)

    def begin(self) -> pathlib.Path:
        """A fresh, empty `new` directory to write the output into."""
        shutil.rmtree(self.new, ignore_errors=True)
        self.new.mkdir(parents=True)
        return self.new

    def commit(self) -> None:
        """Swap the complete `new` in for --out, then delete the previous output (a foreign one is kept aside)."""
        if output_kind(self.out) == "foreign":
            move_aside(self.out, "before-prepare")
        elif self.out.exists():
            os.rename(self.out, self.old)
        os.rename(self.new, self.out)
        shutil.rmtree(self.old, ignore_errors=True)
        shutil.rmtree(self.root)

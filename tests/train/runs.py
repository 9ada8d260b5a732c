"""Launch and compare helpers for end-to-end runs of `calm-train` (one process, or torchrun with N ranks).

One process: `calm_train(...)` runs to the end, `start(...)` returns the Popen.  `Job` is one launch in
a session of its own, its output in a log file: `torchrun --standalone` for N > 1 processes, else plain
`python -m calm_train`.  `Job.kill_all()` is kill -9 of torchrun and of every rank (torchrun starts each
rank in a session of its own, so killing torchrun's process group alone would leave the ranks running),
`Job.signal_ranks()` signals every rank as Slurm does, `Job.kill_launcher()` is kill -9 of torchrun alone and
returns the exit codes of the ranks it leaves behind.  Comparisons: `trajectory` (metrics lines) and
`final_weights` (model.safetensors).  `in_one_process` runs several commands through `calm_train.cli.main` in
one fresh process (the imports are paid once); `rehash` makes a checkpoint's manifest match a changed file.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

from safetensors.torch import load_file


def calm_train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "calm_train", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"calm-train {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def prepare_texts(tokenizer_data: pathlib.Path, out: pathlib.Path, texts: list[str], seq_len: int = 32) -> pathlib.Path:
    """`texts` prepared with the tokenizer of another prepared directory, all in the train split."""
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / f"{out.name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    calm_train("prepare", "--input", str(src), "--tokenizer", str(tokenizer_data / "tokenizer.json"), "--out", str(out),
               "--seq-len", str(seq_len), "--val-fraction", "0")
    return out


def samples(data: pathlib.Path, split: str = "train") -> int:
    return json.loads((data / "dataset.json").read_text())["splits"][split]["samples"]


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one-line error a refused command ends with (exit 1, no traceback; libraries may warn before it)."""
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"calm-train {command}: error: "), proc.stderr[-3000:]
    return line


IN_ONE_PROCESS = textwrap.dedent("""
    import contextlib, io, json, sys
    from calm_train.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps(results))
""")


def in_one_process(*calls: list[str], cwd=None) -> list[dict]:
    """Each argv through calm_train.cli.main, in order, in one fresh process: {"code", "out", "err"} per call."""
    proc = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS, json.dumps([list(c) for c in calls])],
                          capture_output=True, text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def rehash(ckpt: pathlib.Path, rel: str) -> None:
    """Record a changed file of a checkpoint in its manifest (size and sha256), as a legitimate writer would."""
    from calm_train.files import sha256_file
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][rel] = [(ckpt / rel).stat().st_size, sha256_file(ckpt / rel)]
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


class Payload:
    """Unpickling it creates the file `marker`: proof that something was unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker: pathlib.Path) -> bytes:
    """Pickled bytes that create `marker` when loaded (checked once here, then the marker is removed)."""
    data = pickle.dumps(Payload(marker))
    pickle.loads(data)
    assert pathlib.Path(marker).exists()
    pathlib.Path(marker).unlink()
    return data


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "calm_train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def metrics(run_dir: pathlib.Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(proc: subprocess.Popen, run_dir: pathlib.Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def trajectory(run_dir: pathlib.Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in metrics(run_dir)]


def final_weights(run_dir: pathlib.Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs"


# ---------------------------------------------------------------------------------------------
# torchrun jobs


def last_step(run_dir: pathlib.Path) -> int:
    rows = metrics(run_dir)
    return rows[-1]["step"] if rows else 0


class Job:
    """`torchrun --standalone --nproc-per-node N -m calm_train ARGS` (N = 1: `python -m calm_train ARGS`) in a
    session of its own, output appended to `log`."""

    def __init__(self, nproc: int, args: list[str], log: pathlib.Path):
        self.log, self.nproc = log, nproc
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
        with open(log, "a") as out:
            out.write(f"\n===== {' '.join(launcher)} -m calm_train {' '.join(args)}\n")
            out.flush()
            self.offset = out.tell()
            self.proc = subprocess.Popen([sys.executable, *launcher, "-m", "calm_train", *args],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.ranks: list[int] = [self.proc.pid] if nproc == 1 else []

    def output(self) -> str:
        """What this launch wrote (the log may hold earlier launches before it)."""
        with open(self.log) as f:
            f.seek(self.offset)
            return f.read()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"torchrun did not end in {timeout}s:\n{self.output()[-4000:]}") from None

    def rank_pids(self) -> list[int]:
        """The rank processes: torchrun's children (found once, while it runs)."""
        if len(self.ranks) < self.nproc:
            pids = []
            for children in pathlib.Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
                try:
                    pids += [int(pid) for pid in children.read_text().split()]
                except OSError:
                    pass
            self.ranks = sorted(pids)
        return self.ranks

    def wait_for_step(self, run_dir: pathlib.Path, step: int, timeout: float = 300) -> int:
        """Poll metrics.jsonl until a row of step >= `step` (and every rank process is up); the step seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = last_step(run_dir)
            if seen >= step and len(self.rank_pids()) == self.nproc:
                return seen
            if self.proc.poll() is not None:
                raise AssertionError(f"torchrun ended (exit {self.proc.returncode}) before step {step}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.02)
        self.kill_all()
        raise AssertionError(f"step {step} not reached in {timeout}s:\n{self.output()[-4000:]}")

    def kill_all(self) -> None:
        """kill -9 of torchrun first (so it cannot react), then of every rank's process group."""
        groups = []
        for pid in dict.fromkeys([self.proc.pid, *self.rank_pids()]):
            try:
                groups.append(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)
        for pid in self.ranks:
            wait_gone(pid)

    def signal_ranks(self, sig: signal.Signals) -> None:
        for pid in self.rank_pids():
            os.kill(pid, sig)

    def kill_launcher(self, timeout: float = 120) -> tuple[list[int], float]:
        """kill -9 of torchrun alone, its ranks left running (reparented to this process, a child subreaper
        meanwhile, so their exit codes can be read); (every rank's exit code, seconds until the last exited)."""
        ranks = self.rank_pids()
        with child_subreaper():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
            killed, codes = time.monotonic(), {}
            while len(codes) < len(ranks):
                if time.monotonic() - killed > timeout:
                    self.kill_all()
                    raise AssertionError(f"ranks still run {timeout}s after torchrun died:\n{self.output()[-4000:]}")
                for pid in set(ranks) - codes.keys():
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done == pid:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                time.sleep(0.02)
            return [codes[pid] for pid in ranks], time.monotonic() - killed


@contextlib.contextmanager
def child_subreaper():
    """While the block runs, orphaned descendants of this process are reparented to it (Linux prctl), not to init."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_CHILD_SUBREAPER = 36
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def wait_gone(pid: int, timeout: float = 60) -> None:
    """Until `pid` has exited (a zombie waiting for its new parent to reap it counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs {timeout}s after SIGKILL")

"""Training from a bucket, checkpoints mirrored to it (on the session's real S3 server, through a real TCP proxy
that the tests turn into a failing network): a new node with an empty run directory resumes from the bucket
alone, exactly; every CHECKPOINT argument takes the run's URL; and a bucket that cannot be used is one line
before any training, while an upload that keeps failing is reported and the run goes on."""
import json
import os
import socket
import subprocess
import sys
import time

from calm_train.convert.native import verify_checkpoint
from faults import FaultProxy
from runs import Job, calm_train, error_line, in_one_process, metrics, trajectory

QUIET = "logging.progress=false"


def complete_steps(s3, run_url: str) -> list[int]:
    return sorted(int(k.split("/")[1][5:]) for k in s3.keys(run_url) if k.endswith("/manifest.json"))


def test_a_run_killed_mid_upload_resumes_on_an_empty_run_dir_from_the_bucket(s3, bucket, tiny_data, remote_more,
                                                                           tmp_path, monkeypatch):
    """tiny_ar on a mixture of a local and a remote dataset, saving asynchronously every 2 steps, mirrored to the
    bucket: kill -9 while the upload of step 4 hangs before its manifest (mid-run, mid-upload).  A launch on an
    empty run directory takes step 2 (step 4 has no manifest in the bucket), and its metrics.jsonl equals an
    uninterrupted run's, line for line."""
    args = ["train", "tiny_ar", f"data.train={tiny_data}@0.5,{remote_more}@0.5", "train.steps=6",
            "train.save_every=2", QUIET]
    calm_train(*args, f"run_dir={tmp_path / 'uninterrupted'}")
    run_url = f"{bucket}/runs/ar"
    mirrored = [*args, f"train.remote_checkpoints={run_url}", "train.async_save=true"]

    proxy = FaultProxy(s3.endpoint)
    proxy.arm("hold", r"PUT /[^ ]*/checkpoints/step_00000004/manifest\.json ")
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    first = Job(1, [*mirrored, f"run_dir={tmp_path / 'node_a'}"], tmp_path / "node_a.log")
    try:
        assert proxy.triggered.wait(300), first.output()[-3000:]
    finally:
        first.kill_all()
        proxy.close()
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    keys = s3.keys(run_url)
    assert complete_steps(s3, run_url) == [2]
    assert "checkpoints/step_00000004/model.safetensors" in keys        # uploaded, but never taken: no manifest

    node_b = tmp_path / "node_b"
    second = Job(1, [*mirrored, f"run_dir={node_b}"], tmp_path / "node_b.log")
    assert second.wait() == 0, second.output()[-4000:]
    out = second.output()
    assert f"downloaded {run_url}/checkpoints/step_00000002 to {node_b}/checkpoints/step_00000002" in out
    assert trajectory(node_b) == trajectory(tmp_path / "uninterrupted")
    assert [r["step"] for r in metrics(node_b)] == [1, 2, 3, 4, 5, 6]
    assert f"checkpoints mirrored: the newest is {run_url}/checkpoints/step_00000006" in out
    assert complete_steps(s3, run_url) == [4, 6]                         # train.keep_last=2, in the bucket too


def test_tiny_calm_from_a_bucket_and_every_checkpoint_argument_takes_its_url(s3, bucket, tiny_data, remote_more,
                                                                            tiny_ae, tmp_path):
    run, run_url = tmp_path / "calm", f"{bucket}/calm"
    calm_train("train", "tiny_calm", f"run_dir={run}", f"data.train={remote_more}", f"model.autoencoder={tiny_ae}",
               "train.steps=2", "train.save_every=1", f"train.remote_checkpoints={run_url}", QUIET)
    assert complete_steps(s3, run_url) == [1, 2]
    step_1 = f"{run_url}/checkpoints/step_00000001"
    generate = ["--prompt", "The module", "--temperature", "0", "--max-new-tokens", "8"]
    remote_eval, local_eval, remote_text, local_text, converted = in_one_process(
        ["eval", run_url, "--max-tokens", "256"], ["eval", str(run), "--max-tokens", "256"],
        ["generate", run_url, *generate], ["generate", str(run), *generate],
        ["convert", step_1, str(tmp_path / "calm_hf"), "--to", "hf"])
    assert all(r["code"] == 0 for r in (remote_eval, local_eval, remote_text, local_text, converted)), \
        [r["err"][-2000:] for r in (remote_eval, local_eval, remote_text, local_text, converted)]
    ours, theirs = json.loads(remote_eval["out"]), json.loads(local_eval["out"])
    assert {k: v for k, v in ours.items() if k != "checkpoint"} == {k: v for k, v in theirs.items() if k != "checkpoint"}
    assert ours["checkpoint"].endswith("step_00000002") and remote_text["out"] == local_text["out"]
    assert (tmp_path / "calm_hf" / "config.json").is_file() and (tmp_path / "calm_hf" / "autoencoder").is_dir()

    warm = tmp_path / "warm"
    calm_train("train", "tiny_calm", f"run_dir={warm}", f"data.train={tiny_data}", f"model.init_from={run_url}",
               "train.steps=1", QUIET)
    config = (warm / "config.yaml").read_text()
    assert f"init_from: {run_url}" in config and f"autoencoder: {run_url}" in config


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_bucket_that_cannot_be_used_is_one_line_before_any_training(s3, bucket, tiny_data, remote_more, tmp_path):
    """A missing bucket, a denied request, an unreachable endpoint: exit 1, one line naming the URL and the fix,
    nothing trained; and the credentials are written nowhere."""
    denied = s3.user_without_permissions()
    port = _closed_port()
    cases = {
        "missing": ({}, [f"data.train={tiny_data}", "train.remote_checkpoints=s3://no-such-bucket/run"],
                    "s3://no-such-bucket/run: the bucket 'no-such-bucket' does not exist at"),
        "denied": (denied, [f"data.train={remote_more}"], f"{remote_more}/dataset.json: the request was denied (403"),
        "unreachable": ({"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"},
                        [f"data.train={tiny_data}", f"train.remote_checkpoints={bucket}/run"],
                        f"{bucket}/run: cannot reach http://127.0.0.1:{port}"),
    }
    for name, (env, overrides, says) in cases.items():
        run = tmp_path / name
        s3.authorization(name == "denied")
        try:
            proc = subprocess.run([sys.executable, "-m", "calm_train", "train", "tiny_ar", f"run_dir={run}",
                                   "train.steps=2", QUIET, *overrides], env={**os.environ, **env, "AWS_MAX_ATTEMPTS": "2"},
                                  capture_output=True, text=True, timeout=300)
        finally:
            s3.authorization(False)
        line = error_line(proc, "train")
        assert says in line and "Fix: " in line, (name, line)
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
        written = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file()) if run.exists() else b""
        assert denied["AWS_SECRET_ACCESS_KEY"].encode() not in written + proc.stderr.encode()


def test_an_upload_that_keeps_failing_is_retried_reported_and_the_run_goes_on(s3, bucket, tiny_data, tmp_path,
                                                                             monkeypatch):
    """The network fails at the first upload of step 2 and stays down: every attempt is retried, then reported;
    training continues, the local checkpoint is intact, and once the network is back step 3 is mirrored."""
    run, run_url = tmp_path / "run", f"{bucket}/ar"
    proxy = FaultProxy(s3.endpoint)
    proxy.arm("refuse", r"PUT /[^ ]*/checkpoints/step_00000002/")
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")            # botocore's own retries off: the mirror's are the ones seen
    job = Job(1, ["train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=3", "train.save_every=2",
                  f"train.remote_checkpoints={run_url}", QUIET], tmp_path / "run.log")
    try:
        reported = f"could not mirror step_00000002 to {run_url}/checkpoints/step_00000002 after 3 attempts"
        deadline = time.monotonic() + 300
        while job.proc.poll() is None and reported not in job.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        proxy.passthrough()
        assert job.wait() == 0, job.output()[-4000:]
    finally:
        proxy.close()
    out = job.output()
    assert reported in out and "upload attempt 1 of 3 failed" in out and "upload attempt 2 of 3 failed" in out
    assert "The local checkpoint is intact and the run goes on" in out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert verify_checkpoint(run / "checkpoints" / "step_00000002")["step"] == 2
    assert f"mirrored step_00000003 to {run_url}/checkpoints/step_00000003" in out
    assert complete_steps(s3, run_url) == [3]

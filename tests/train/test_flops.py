"""MFU has one meaning: against the configured peak, else the device's spec, else a measured GEMM (never > 1)."""
import torch

from calm_train.train.flops import MFU, spec_peak_flops


def test_spec_peaks_of_known_devices_in_bf16_only():
    assert spec_peak_flops("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert spec_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert spec_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert spec_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert spec_peak_flops("NVIDIA H100 NVL", torch.bfloat16) is None
    assert spec_peak_flops("NVIDIA H200", torch.float32) is None and spec_peak_flops("cpu", torch.bfloat16) is None


def test_mfu_names_its_peak_and_keeps_the_measured_column():
    spec = MFU(flops_per_token=1e9, world_size=8, measured=700e12, spec=989.4e12, configured=0, device_name="NVIDIA H200")
    row, note = spec.row(tokens_per_s=8 * 200_000)
    assert note is None and row["mfu_peak_source"] == "spec NVIDIA H200 bf16 dense"
    assert abs(row["mfu"] - 200e12 / 989.4e12) < 1e-12 and abs(row["mfu_measured"] - 200 / 700) < 1e-12
    configured = MFU(1e9, 1, measured=1e12, spec=989.4e12, configured=500e12, device_name="NVIDIA H200")
    assert configured.row(100_000)[0]["mfu_peak_source"] == "train.peak_flops"


def test_a_measured_peak_below_the_achieved_rate_is_raised_never_above_one():
    mfu = MFU(flops_per_token=1e6, world_size=1, measured=1e9, spec=None, configured=0, device_name="cpu")
    row, note = mfu.row(tokens_per_s=500)                  # 0.5 GFLOP/s: half the measured peak
    assert note is None and row["mfu"] == row["mfu_measured"] == 0.5 and row["mfu_peak_source"] == "measured GEMM"
    row, note = mfu.row(tokens_per_s=2970)                 # 2.97x the measurement taken on a busy machine
    assert row["mfu"] == row["mfu_measured"] == 1.0 and "busy" in note
    row, note = mfu.row(tokens_per_s=1485)
    assert note is None and abs(row["mfu_measured"] - 0.5) < 1e-12 and abs(row["mfu_peak_tflops"] - 2.97e-3) < 1e-12

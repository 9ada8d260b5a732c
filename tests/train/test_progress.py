"""The progress display: a tqdm bar on a terminal, plain lines otherwise, ETA over a window of steps."""
import io

from calm_train.train.progress import ProgressDisplay, Throughput, format_seconds


def _row(step: int) -> dict:
    return {"step": step, "loss": 2.5, "peak_mem_gib": 1.25}


def test_eta_is_smoothed_over_the_window():
    window = Throughput(window=20)
    for _ in range(19):
        window.add(1.0, 100)
    window.add(10.0, 100)                         # one slow step (an evaluation, a save)
    assert abs(window.eta_s(100) - 100 * 29 / 20) < 1e-9    # not 100 x 10 s as the last step alone says
    assert abs(window.tokens_per_s() - 2000 / 29) < 1e-9
    assert Throughput().eta_s(5) is None and format_seconds(None) == "?"
    assert (format_seconds(75), format_seconds(3725)) == ("1:15", "1:02:05")


def test_not_a_tty_writes_one_plain_line_per_logged_row():
    stream = io.StringIO()
    display = ProgressDisplay(total=6, stream=stream, interactive=False)
    for step in range(1, 7):
        display.advance(step, 0.5, 256, 2.5)
        if step % 2 == 0:
            display.logged(_row(step))
    display.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[0] == "[calm-train] step 2/6 loss 2.5000 | 512 tok/s | eta 0:02 mem 1.25 GiB"


def test_a_tty_gets_a_live_bar_with_loss_throughput_and_eta():
    stream = io.StringIO()
    display = ProgressDisplay(total=4, stream=stream, interactive=True)
    for step in range(1, 5):
        display.advance(step, 0.5, 256, 2.5)
        display.logged(_row(step))                 # no extra lines under a bar
    display.write("[calm-train] saved")
    display.close()
    text = stream.getvalue()
    assert "\r" in text and "4/4" in text and "loss 2.5000 | 512 tok/s | eta 0:00" in text
    assert "[calm-train] step" not in text and "[calm-train] saved\n" in text

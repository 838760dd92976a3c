"""Training logs read back (ours and Caffe's own lines) and the learning-curve figures."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lymph_cv.errors import ConfigError, FormatError
from lymph_cv.formats.caffelog import parse_log
from lymph_cv.stages.curves import CHARTS, chart, fold_logs, plot_charts, plot_overview, read_logs
from logutil import CAFFE_LOG


def test_parse_reads_what_caffes_parse_log_reads():
    log = parse_log(CAFFE_LOG)
    assert [r.iteration for r in log.train] == [0, 100, 200, 300]
    assert [r.outputs["loss"] for r in log.train] == [1.1, 0.65, 0.45, 0.25]  # the net output, not the smoothed loss
    assert [r.lr for r in log.train] == [0.01, 0.001, 0.0001, 1e-05]  # the rate logged at the row's iteration
    # The resumed run's test at 200 replaces the first one.
    assert [(r.iteration, r.outputs) for r in log.test] == [(0, {"accuracy": 0.33, "loss": 1.0986}),
                                                             (200, {"accuracy": 0.75, "loss": 0.6})]
    # Seconds run on across New Year (glog stamps have no year): 23:59:58 → 00:01:10 next day.
    assert log.train[-1].seconds == pytest.approx(72.0)
    assert log.series("test", "accuracy") == ([0, 200], [0.33, 0.75])
    assert log.series("train", "lr", "seconds")[0][0] == pytest.approx(1.8)
    assert log.names("test") == ["accuracy", "loss"]


def test_our_own_log_round_trips(tmp_path):
    """The lines our trainer writes parse back (same formatter, same regexes)."""
    from lymph_cv.formats import caffelog

    path = tmp_path / "1" / "train.log"
    with caffelog.caffe_log(path, stream=open(tmp_path / "stderr", "w")) as log:
        log.info("Solving net", caffelog.SRC_SOLVE)
        for it in (0, 10):
            log.info(f"Iteration {it}, Testing net (#0)", caffelog.SRC_TEST)
            log.info(f"    Test net output #0: accuracy = {caffelog.fmt(0.5 + it / 100)}", caffelog.SRC_TEST_OUTPUT)
            log.info(f"Iteration {it}, loss = {caffelog.fmt(1 / (it + 1))}", caffelog.SRC_DISPLAY)
            log.info(f"    Train net output #0: loss = {caffelog.fmt(1 / (it + 1))} (* 1 = 1 loss)", caffelog.SRC_TRAIN_OUTPUT)
            log.info(f"Iteration {it}, lr = 0.001", caffelog.SRC_LR)
    (label, parsed), = read_logs([path])
    assert label == "fold 1"
    assert parsed.series("test", "accuracy") == ([0, 10], [0.5, 0.6])
    assert parsed.series("train", "loss")[1] == [1.0, pytest.approx(1 / 11, rel=1e-5)]
    assert fold_logs(tmp_path) == [("fold 1", path)]


def test_not_a_log_is_a_format_error():
    with pytest.raises(FormatError, match="not a Caffe training log"):
        parse_log('{"a": 1}\n', "x.json")


def test_chart_types_are_plot_training_logs():
    assert [c.name for c in CHARTS[:2]] == ["test-accuracy-iterations", "test-accuracy-seconds"]
    assert chart("7") == chart("train-loss-seconds") and chart("4").field == "lr"
    with pytest.raises(ConfigError, match="valid: 0=test-accuracy-iterations"):
        chart("8")


def _decode(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_figures_overlay_logs(tmp_path):
    logs = [("fold 1", parse_log(CAFFE_LOG)), ("fold 2", parse_log(CAFFE_LOG.replace("= 0.75", "= 0.9")))]
    overview = _decode(plot_overview(logs))
    assert overview.shape[1] > 2 * overview.shape[0]  # three panels side by side
    both = _decode(plot_charts(logs, [chart("0"), chart("7")]))
    assert both.shape[0] < both.shape[1]
    # Colour of fold 2 (tab10 orange, BGR 14,127,255) is drawn.
    assert (np.abs(both.astype(int) - (14, 127, 255)).sum(axis=2) < 40).any()


def test_cli_plot_log(tmp_path, runner, cli):
    (tmp_path / "w" / "1").mkdir(parents=True)
    (tmp_path / "w" / "1" / "train.log").write_text(CAFFE_LOG)
    caffe_log = tmp_path / "caffe.log"
    caffe_log.write_text(CAFFE_LOG)
    out = tmp_path / "curves.png"
    result = runner.invoke(cli, ["plot-log", str(tmp_path / "w"), str(caffe_log), "-o", str(out), "--chart", "6"])
    assert result.exit_code == 0, result.stderr
    _decode(out.read_bytes())
    bad = runner.invoke(cli, ["plot-log", str(out), "-o", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and "not a Caffe training log" in bad.stderr
    assert not (tmp_path / "x.png").exists()

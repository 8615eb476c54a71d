"""axes_pipeline.console: what a long stage shows while it works."""

from __future__ import annotations

# --- long work shows progress: a bar on a terminal, one line per finished unit in a log -----------


def test_progress_writes_one_line_per_finished_unit_when_not_a_terminal(capsys):
    from axes_pipeline.console import progress

    seen = list(progress(["conv1", "layer1.0.conv1"], "axes", label=str))
    out, err = capsys.readouterr()
    assert seen == ["conv1", "layer1.0.conv1"]
    lines = out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["axes: 1/2 conv1", "axes: 2/2 layer1.0.conv1"]
    assert "\r" not in out + err


def test_progress_is_a_bar_on_a_terminal_and_silent_when_disabled(capsys, monkeypatch):
    import sys

    from axes_pipeline.console import progress

    assert list(progress(range(3), "quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert list(progress(range(3), "bar")) == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out == "" and "bar" in err          # tqdm draws on stderr; no unit lines on stdout


def test_a_lightning_line_is_printed_once_under_hydra_logging(capsys):
    """Lightning's umbrella package puts its own console handler on the "lightning" logger; under Hydra
    the root logger prints too, so every Lightning INFO line appeared twice in the demo's log."""
    import logging

    import lightning  # noqa: F401 - its import adds the handler

    from axes_pipeline.tasks import _single_log_stream

    root = logging.getLogger()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep()
    root.addHandler(keep)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
             for n in ("lightning", "lightning.pytorch", "lightning.fabric")}
    try:
        _single_log_stream()
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        assert seen == ["GPU available: False, used: False"]                 # once, through the root
        assert "GPU available" not in capsys.readouterr().err               # not again by Lightning's handler
        assert logging.getLogger("torch.utils.cpp_extension").getEffectiveLevel() >= logging.ERROR
    finally:
        root.removeHandler(keep)
        for n, (handlers, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:] = handlers
            lg.propagate = propagate


def test_no_cuda_toolkit_notice_on_a_cpu_run(tmp_path):
    """A CPU machine with a CUDA toolkit: importing torch.utils.cpp_extension (torch.compile does) warned
    "No CUDA runtime is found" in the demo's log. An entry point imports the task wrapper first."""
    import os
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(); import axes_pipeline.tasks; "
            "import torch.utils.cpp_extension as c; print('home', c.CUDA_HOME)")
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"home {tmp_path}" in res.stdout                  # the toolkit was found, so torch would have said so
    assert "No CUDA runtime" not in res.stderr + res.stdout

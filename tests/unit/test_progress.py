"""Progress output: a bar on a terminal, plain periodic lines in a log (no control codes), messages
never on a bar's line; the toy base-model build serialised by a lock on its cache entry."""

from __future__ import annotations

import io
import threading
import time

from alignkit.training.logging import progress_bar, refresh_due, say


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_plain_lines_with_steps_rate_and_eta(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    bar = progress_bar(total=4, desc="sft", unit="step", file=log)
    for i in range(4):
        time.sleep(0.01)
        bar.update(1)
        if i == 1:
            say("eval @ step 2: loss=1.0", file=log)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and "\n\n" not in text
    lines = text.splitlines()
    assert lines[0].startswith("sft:   0% 0/4")
    assert lines[-1].startswith("sft: 100% 4/4") and ("step/s" in lines[-1] or "s/step" in lines[-1])
    assert "<00:00" in lines[-1]  # elapsed<remaining
    assert "eval @ step 2: loss=1.0" in lines  # a message is a line of its own


def test_log_lines_are_periodic_not_per_step(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    bar = progress_bar(total=500, desc="rollouts", file=log)
    for _ in range(500):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "0/500" in lines[0] and "500/500" in lines[1]  # the first and the last
    assert refresh_due(bar) and not refresh_due(bar)  # hand-made refreshes keep to the interval too


def test_terminal_gets_a_bar_and_messages_above_it():
    tty = _Tty()
    bar = progress_bar(total=3, desc="demo", file=tty, mininterval=0)
    bar.update(1)
    say("[toy] building", file=tty)
    bar.update(2)
    bar.close()
    out = tty.getvalue()
    assert "\r" in out and "3/3" in out  # an in-place bar
    # the message starts a line of its own and the bar is redrawn after it
    before, after = out.split("[toy] building", 1)
    assert before.endswith("\r") and after.startswith("\n") and "demo" in after


def test_second_build_of_the_same_toy_model_waits_and_reuses(tmp_path, monkeypatch):
    from alignkit.toy import model as toy

    monkeypatch.setenv("ALIGNKIT_CACHE_DIR", str(tmp_path))
    builds = []

    def fake_build(entry, p, seed, progress, log):  # stands for the minutes-long real build
        builds.append(threading.current_thread().name)
        time.sleep(1.0)
        entry.mkdir(parents=True)
        for f in toy.MODEL_FILES + (toy.DONE_FILE,):
            (entry / f).write_text("{}")

    monkeypatch.setattr(toy, "_build_locked", fake_build)
    logs: dict[str, list[str]] = {"a": [], "b": []}
    paths = {}

    def go(name):
        paths[name] = toy.build_base_model(preset="tiny", log=logs[name].append)

    a = threading.Thread(target=go, args=("a",), name="a")
    a.start()
    time.sleep(0.3)
    b = threading.Thread(target=go, args=("b",), name="b")
    b.start()
    a.join(10)
    b.join(10)
    assert builds == ["a"]  # built once
    assert paths["a"] == paths["b"] and toy.is_built(paths["b"])
    assert any("another process is building" in m and "waiting" in m for m in logs["b"]), logs["b"]
    assert any("reusing" in m for m in logs["b"]), logs["b"]
    assert not logs["a"]

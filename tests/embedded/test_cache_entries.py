"""Shared cache entries (the converted embedded model, pretrained towers) are filled once: a second process waits for
the first and uses its entry; an interrupted fill leaves nothing that a later run takes for a finished entry."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peft_vlm.embedded import models
from peft_vlm.embedded.models import fill_once

FILL_THEN_HANG = ("import sys, time; from pathlib import Path; from peft_vlm.embedded.models import fill_once\n"
                  "def fill(partial):\n"
                  "    partial.write_text('half of it'); print('filling', flush=True); time.sleep(600)\n"
                  "fill_once(Path(sys.argv[1]), fill)")


def test_a_second_filler_of_an_empty_entry_waits_for_the_first_and_uses_its_entry(tmp_path):
    entry, started, finish, fills, results = tmp_path / "entry", threading.Event(), threading.Event(), [], {}

    def slow_fill(partial):
        fills.append(threading.current_thread().name)
        started.set()
        assert finish.wait(30)
        partial.write_text("complete")

    def use(name):
        results[name] = fill_once(entry, slow_fill).read_text()

    first = threading.Thread(target=use, args=("first",), name="first")
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=use, args=("second",), name="second")
    second.start()
    time.sleep(0.5)
    assert second.is_alive() and not entry.exists()  # waiting for the first, not filling its own
    finish.set()
    first.join(30), second.join(30)
    assert fills == ["first"] and results == {"first": "complete", "second": "complete"}


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_fill_that_raises_leaves_no_entry_and_no_temporary_file(kind, tmp_path):
    entry = tmp_path / "entry"

    def failing_fill(partial):
        if kind == "folder":
            partial.mkdir()
            (partial / "config.json").write_text("{}")  # the weights never come
        else:
            partial.write_text("half of it")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fill_once(entry, failing_fill)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.lock"]
    assert fill_once(entry, lambda partial: partial.write_text("complete")).read_text() == "complete"


def test_a_fill_killed_half_way_leaves_no_entry_and_its_leftover_is_not_taken_for_one(tmp_path):
    entry = tmp_path / "entry"
    env = {**os.environ, "PYTHONPATH": str(Path(models.__file__).parents[2])}
    filler = subprocess.Popen([sys.executable, "-c", FILL_THEN_HANG, str(entry)], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert filler.stdout.readline().strip() == "filling"
    filler.send_signal(signal.SIGKILL)
    filler.wait()
    assert not entry.exists() and any(".partial" in p.name for p in tmp_path.iterdir())
    assert fill_once(entry, lambda partial: partial.write_text("complete")).read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]  # the leftover is gone


def test_an_interrupted_model_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_VLM_CACHE", str(tmp_path))

    def interrupted(partial):
        partial.mkdir()
        (partial / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.default_language_model_path()
    assert [p.name for p in tmp_path.iterdir()] == [models.CACHE_NAME + ".lock"]


def test_an_interrupted_tower_pretraining_leaves_no_cache_entry(tmp_path, monkeypatch):
    from peft_vlm.embedded import tower_pretraining as vp

    monkeypatch.setenv("PEFT_VLM_CACHE", str(tmp_path))

    def interrupted(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(vp, "train_tower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vp.pretrained_tower(steps=1)
    assert [p.name for p in (tmp_path / models.TOWER_CACHE).iterdir() if not p.name.endswith(".lock")] == []

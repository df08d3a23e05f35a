"""Harmless third-party messages are silenced in a `peft-vlm` run, narrowly: a warning the user caused still shows,
and importing the library silences nothing."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import TINY_VIT
from peft_vlm.runtime import quiet

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "llava_lora.yaml"
SILENCED = ["Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU",
            "`use_cache=True` is incompatible with gradient checkpointing",
            "`gradient_checkpointing_enable` is deprecated"]


def test_a_cli_run_prints_none_of_the_harmless_messages_but_the_users_own_warning(tmp_path, tokenizer, lm_factory):
    lm_factory().save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    (tmp_path / "vit.json").write_text(json.dumps(TINY_VIT))
    for name, rgb in [("red", (220, 20, 20)), ("blue", (20, 20, 220))]:
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
    rows = [{"image": f"{c}.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                     {"from": "gpt", "value": c}]} for c in ["red", "blue"] * 2]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    overrides = ["stages=null", "methods=[lora]", f"data.train.path={tmp_path / 'data.json'}",
                 f"data.image_root={tmp_path}",
                 "data.train.format=llava",
                 f"model.language_model={tmp_path / 'lm'}", "model.vision=vit", f"train.output_dir={tmp_path / 'out'}",
                 "train.batch_size=2", "train.progress_bar=false", "train.checkpoint_every=0",
                 "train.gradient_checkpointing=true", "train.report_to=null"]
    # a tower named without pretrained weights: open_clip's warning about it is the user's to see
    code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from peft_vlm.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    command = [sys.executable, "-c", code, str(tmp_path / "vit.json"), "train", str(RECIPE), "--max-steps", "1",
               *[item for override in overrides for item in ("--set", override)]]
    # CI=1: transformers then lets its records propagate to the root logger, past its own handler
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CI": "1"}
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = completed.stdout + completed.stderr
    assert [message for message in SILENCED if message in printed] == []
    assert "No pretrained weights loaded for model 'vit'" in printed


def test_only_the_named_messages_are_silenced_and_uninstall_shows_them_again(caplog):
    logger = logging.getLogger("DeepSpeed")
    propagate, logger.propagate = logger.propagate, True  # so that caplog sees it
    try:
        quiet.install()
        with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
            logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
            logger.warning("ZeRO stage 3 needs more memory than this machine has")
        assert {r.getMessage() for r in caplog.records} == {"ZeRO stage 3 needs more memory than this machine has"}
        quiet.uninstall()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
            logger.warning("Setting accelerator to CPU.")
        assert {r.getMessage() for r in caplog.records} == {"Setting accelerator to CPU."}
    finally:
        quiet.uninstall()
        logger.propagate = propagate


def test_importing_the_library_silences_nothing():
    code = "import peft_vlm, peft_vlm.runtime.quiet as q; print(len(q._installed))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "0"

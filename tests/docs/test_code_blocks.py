"""Every code block of README.md and docs/ runs as written (Sybil): Python blocks in one namespace per page, bash
blocks in a shell at the repository root. A block that runs a long job or needs what a test cannot make is preceded
by `<!-- skip: next "why" -->`, which the page shows in its source."""
import os
import subprocess
import sys
from unittest import SkipTest
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
pytestmark = pytest.mark.real_model  # the quickstart builds the embedded default


def run_bash(example):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", example.parsed], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{example.path}:{example.line}\n{done.stdout}\n{done.stderr}"


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser(language="bash", evaluator=run_bash), SkipParser()])


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_code_block_on_the_page_runs(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    document, skipped = SYBIL.parse(page), []
    for example in document.examples():
        try:
            example.evaluate()
        except SkipTest as reason:  # a block marked `<!-- skip: next "why" -->`; the page goes on
            skipped.append(f"line {example.line}: {reason}")
    print("\n".join(skipped))

"""`omniattr annotate`: the CLI runs training.annotation.cli in its own process (the CLI is the composition root)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "omniattr.cli"]


def _run(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *arguments], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_annotate_help_lists_the_subcommands():
    result = _run("annotate", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("label", "export-sft", "finetune", "mine"):
        assert command in result.stdout
    label = _run("annotate", "label", "--help")
    assert label.returncode == 0 and "--endpoint" in label.stdout and "--finetuned" in label.stdout
    assert "annotate" in _run("--help").stdout


@pytest.mark.slow
def test_annotate_label_against_a_closed_port_records_failures_and_exits_1(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pairs = tmp_path / "pairs"
    for name in ("a", "b"):
        (pairs / name).mkdir(parents=True)
        for side in "xy":
            Image.new("RGB", (8, 8), (len(name), 0, 0)).save(pairs / name / f"{side}.png")
    out = tmp_path / "dataset"
    result = _run(
        "annotate",
        "label",
        str(pairs),
        "--out",
        str(out),
        "--endpoint",
        f"http://127.0.0.1:{port}/v1",
        "--model",
        "big-vlm",
        "--max-attempts",
        "1",
        "--concurrency",
        "1",
        "--no-progress",
    )
    assert result.returncode == 1, result.stderr
    assert "2 failed" in result.stdout and "unreachable 2" in result.stdout
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["a", "b"]

    usage = _run("annotate", "label", str(pairs), "--out", str(out))
    assert usage.returncode != 0 and "exactly one of --endpoint" in usage.stderr

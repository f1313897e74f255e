"""benchmarks/suite.sh on a machine without a GPU: GPU steps are skipped with their reason, the results file and
the short table are written, and a copy lands in $OUT (how the lent GPU machines return files)."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.sh"
pytestmark = pytest.mark.timeout(120)


def test_suite_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0
    out = subprocess.run([str(SUITE), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "benchmarks/suite.sh --quick" in out.stdout
    assert subprocess.run([str(SUITE), "--bogus"], capture_output=True, timeout=30).returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel steps would run for real")
def test_gpu_steps_are_skipped_with_a_reason(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "OUT": str(out_dir)}
    run = subprocess.run([str(SUITE), "--skip-install", "--python", sys.executable, "--quick", "--only", "moe,offline",
                          "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, env=env,
                         timeout=100)
    assert run.returncode == 0, run.stderr
    (results,) = (tmp_path / "results").glob("*-cpu.md")
    text = results.read_text()
    assert "| moe | skipped: needs a CUDA GPU | 0 |" in text and "## offline\n\nskipped: needs a CUDA GPU" in text
    assert run.stdout.rstrip().endswith("| moe | skipped: needs a CUDA GPU | 0 |  |")  # the short table, last
    assert (out_dir / results.name).read_text() == text
    (archive,) = out_dir.glob("*-cpu.tar.gz")
    with tarfile.open(archive) as tar:
        assert any(name.endswith("steps.tsv") for name in tar.getnames())

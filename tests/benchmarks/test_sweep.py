"""benchmarks/sweep.py: a real `partita serve` (Ray, tiny-moe on CPU) started, benchmarked and stopped, next to
an endpoint already running and a deployment this build refuses; one table with a row for each."""
from __future__ import annotations

import json

import pytest

from tests.benchmarks.harness import assert_consistent, sweep

pytestmark = pytest.mark.timeout(240)


def test_deployment_forms():
    assert sweep.parse_deployment("a=http://h:1") == sweep.Deployment("a", url="http://h:1")
    assert sweep.parse_deployment("pd=--config x.yaml -dp 2") == \
           sweep.Deployment("pd", serve_args=("--config", "x.yaml", "-dp", "2"))
    for bad in ("no-equals", "bad name=http://h:1", "=http://h:1"):
        with pytest.raises(ValueError, match="NAME=URL"):
            sweep.parse_deployment(bad)


def test_serve_start_measure_stop_and_one_table(gateway, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a private local Ray
    afd = tmp_path / "afd.yaml"
    afd.write_text("pools: [{name: attn, role: attention}]\n")  # a role this build refuses
    rc = sweep.main(["--output-dir", str(tmp_path), "--num-requests", "8", "--request-rate", "8", "inf",
                     "--input-len", "16", "--output-len", "6", "--goodput", "ttft:60000", "--no-progress",
                     "--request-timeout-s", "60", "--serve-timeout-s", "150",
                     "--deployment", "serve=--gpus-per-worker 0 --max-model-len 256",
                     "--deployment", f"inproc={gateway.http_url}",
                     "--deployment", f"afd=--config {afd}"])
    assert rc == 1  # afd did not run
    table = (tmp_path / "sweep.md").read_text()
    assert capsys.readouterr().out.rstrip().endswith(table.split("\n\n", 1)[1].rstrip())  # printed last
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0:2] for row in rows[:4]] == [["| serve", "8"], ["| serve", "inf"],
                                                          ["| inproc", "8"], ["| inproc", "inf"]]
    assert rows[4].startswith("| afd | did not run: RuntimeError: partita serve exited 2 before printing its "
                              "endpoints: partita: error: pools[0].role: role 'attention' is not implemented yet")
    served = json.loads((tmp_path / "serve.json").read_text())
    assert served["endpoint"]["root"] == "tiny-moe"
    for run in served["runs"]:
        assert_consistent(run, 8)
        assert run["server_counters"]["generation_tokens"] == 48  # the Ray deployment's own count
    assert "partita: shutting down" in (tmp_path / "serve-serve.log").read_text()  # stopped by SIGINT
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [d["label"] for d in summary["deployments"]] == ["serve", "inproc", "afd"]
    assert summary["deployments"][2]["error"] and not summary["deployments"][2]["runs"]

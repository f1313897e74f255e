"""The `partita` command: settings precedence (flags > PARTITA_* > --config > defaults), refusals before any
Ray starts, status formatting, and `partita serve` end to end in a subprocess: endpoints printed, requests
answered over HTTP and gRPC, `partita status` from another process, clean exit on Ctrl-C (SIGINT)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from partita.cluster.cli import build_parser, build_spec, format_status, main
from partita.cluster.spec import ModelSpec, SpecError

pytestmark = pytest.mark.timeout(240)
BIN = os.path.dirname(sys.executable)


def spec_of(argv, environ=None):
    return build_spec(build_parser().parse_args(["serve", *argv]), environ or {})


def test_no_arguments_is_the_embedded_default():
    spec = spec_of([])
    assert spec.model == ModelSpec(preset="tiny-moe") and len(spec.pools) == 1
    assert spec.pools[0].gpus_per_worker is None  # GPUs if the Ray cluster has them, CPU otherwise
    assert (spec.gateway.grpc_port, spec.gateway.http_port) == (50051, 8000)


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    config = tmp_path / "spec.yaml"
    config.write_text("model: {preset: tiny-llama, seed: 3}\n"
                      "pools: [{name: a, replicas: 2}, {name: b}]\n"
                      "scheduler: {max_model_len: 512, max_num_seqs: 8}\n"
                      "gateway: {http_port: 9000, grpc_port: 9001, api_key: from-file}\n")
    spec = spec_of(["--config", str(config)])
    assert (spec.model.preset, spec.model.seed, spec.scheduler.max_model_len) == ("tiny-llama", 3, 512)
    env = {"PARTITA_GATEWAY__API_KEY": "from-env", "PARTITA_SCHEDULER__MAX_NUM_SEQS": "4"}
    spec = spec_of(["--config", str(config)], env)
    assert spec.gateway.api_key == "from-env" and spec.scheduler.max_num_seqs == 4
    spec = spec_of(["tiny-moe", "--config", str(config), "--api-key", "from-flag", "--max-num-seqs", "2",
                    "--max-model-len", "128", "--http-port", "0", "--data-parallel-size", "3",
                    "--shutdown-timeout", "5", "--max-queued-requests", "7"], env)
    assert spec.model == ModelSpec(preset="tiny-moe", seed=3)  # MODEL replaces the checkpoint, keeps the rest
    assert (spec.gateway.api_key, spec.scheduler.max_num_seqs, spec.scheduler.max_model_len) == ("from-flag", 2, 128)
    assert (spec.gateway.http_port, spec.gateway.grpc_port) == (0, 9001)
    assert [p.replicas for p in spec.pools] == [3, 3]
    assert (spec.gateway.drain_timeout_s, spec.gateway.max_queued_requests) == (5.0, 7)
    assert spec_of(["--model", "/models/x"]).model == ModelSpec(path="/models/x")


def test_refusals_name_the_path_and_start_nothing(capsys, tmp_path):
    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert "partita: error: scheduler.max_num_seqs: must be > 0, got 0" in capsys.readouterr().err
    assert main(["serve", "--tensor-parallel-size", "2", "--gpus-per-worker", "0"]) == 2
    assert "pools[0].tensor_parallel_size" in capsys.readouterr().err
    config = tmp_path / "pd.yaml"
    config.write_text("pools: [{name: pre, role: prefill}]\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "pools[0].role: a prefill pool needs a decode pool beside it" in capsys.readouterr().err
    with pytest.raises(SpecError, match="disagree"):
        spec_of(["tiny-moe", "--model", "tiny-llama"])


def test_status_table():
    status = {"name": "d", "model": "tiny-moe", "events": ["12:00:00 p-1 ready on node abc"],
              "pools": [{"name": "p", "role": "colocated", "desired_replicas": 2, "ready_replicas": 1,
                         "starting_replicas": 1, "draining_replicas": 0, "consecutive_failures": 1,
                         "restart_in_s": 3.2}],
              "workers": [{"worker_id": "p-1", "state": "ready", "device": "cpu", "node_id": "abcdef0123456789",
                           "load": {"num_running": 3, "num_waiting": 1, "kv_cache_usage": 0.25}}]}
    text = format_status(status)
    assert "in 3 s (1 failures)" in text and "p-1" in text and "25.0" in text and "abcdef012345 " in text


def _read_endpoints(proc, timeout_s: float) -> dict:
    deadline, lines = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.strip().startswith("stop"):
            text = "".join(lines)
            return {"grpc": re.search(r"grpc\s+(\S+)", text).group(1),
                    "http": re.search(r"http\s+(\S+)/v1", text).group(1),
                    "ray": re.search(r"ray\s+(\S+)", text).group(1)}
    pytest.fail("partita serve printed no endpoints:\n" + "".join(lines) + (proc.stderr.read() if proc.poll() else ""))


def _serve_env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _start_serve(cwd) -> subprocess.Popen:
    """`partita serve` on its embedded default (a local Ray), in a process group of its own."""
    return subprocess.Popen([os.path.join(BIN, "partita"), "serve", "--http-port", "0", "--grpc-port", "0",
                             "--max-model-len", "256", "--gpus-per-worker", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_serve_env(), cwd=cwd, start_new_session=True)


def test_partita_serve_answers_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = _serve_env()
    proc = _start_serve(tmp_path)
    try:
        endpoints = _read_endpoints(proc, 150)
        request = urllib.request.Request(
            endpoints["http"] + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": "Hi", "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert body["model"] == "tiny-moe" and body["usage"]["completion_tokens"] == 6

        from partita.client import Client

        with Client(endpoints["grpc"]) as client:
            assert len(client.generate([3, 4, 5], max_tokens=5, ignore_eos=True).token_ids) == 5

        status = subprocess.run([os.path.join(BIN, "partita"), "status", "--address", endpoints["ray"]],
                                capture_output=True, text=True, env=env, timeout=90)
        assert status.returncode == 0, status.stderr
        assert "default-0" in status.stdout and "ready" in status.stdout

        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert proc.wait(timeout=60) == 0
        assert "partita: shutting down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_partita_serve_stops_promptly_when_its_whole_group_gets_sigterm(tmp_path):
    """systemd's default stop (and `kill -- -PGID`) also terminates the local Ray's processes: the workers are gone
    with them, and serve must not wait out the controller's 60 s shutdown timeout for them."""
    proc = _start_serve(tmp_path)
    try:
        _read_endpoints(proc, 150)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        stderr = proc.stderr.read()
        assert "the local Ray stopped with this process" in stderr and "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

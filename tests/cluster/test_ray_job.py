"""`ray job submit --working-dir DIR -- partita serve --config FILE` onto a running Ray cluster.

A Ray head (with its dashboard, which hosts the job API) is started for the module with `ray start --head
--block` in its own process group, token authentication on with a token of the test's own; the job is
submitted through `ray.job_submission.JobSubmissionClient`, answers over HTTP and gRPC, and stops cleanly
on `stop_job` (SIGTERM), leaving no deployment behind.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.request

import pytest

from tests.cluster.ray_fixtures import free_port, wait_until

pytestmark = pytest.mark.timeout(300)
BIN = os.path.dirname(sys.executable)
JOB_SPEC = """\
name: job
model: {preset: tiny-moe}
pools: [{name: p, replicas: 1, gpus_per_worker: 0}]
scheduler: {max_model_len: 256, max_num_seqs: 8}
gateway: {grpc_port: 0, http_port: 0, drain_timeout_s: 5}
"""


@pytest.fixture(scope="module")
def ray_head():
    from ray.job_submission import JobSubmissionClient

    port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ptj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [os.path.join(BIN, "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard_port}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=3", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def connect():
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n" + open(log_path).read()[-3000:])
        try:
            return JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}",
                                       headers={"Authorization": f"Bearer {token}"})
        except Exception:  # noqa: BLE001 - the dashboard is not up yet
            return None

    try:
        client = wait_until(connect, 120, "the Ray dashboard's job API", interval_s=1.0)
        yield {"client": client, "address": f"127.0.0.1:{port}", "env": env}
    finally:
        _stop_process_group(head)


def _stop_process_group(proc: subprocess.Popen) -> None:
    """Stops `ray start --block` and everything it started (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _endpoints(client, job_id: str) -> dict:
    def printed():
        logs = client.get_job_logs(job_id)
        if client.get_job_status(job_id).is_terminal():
            pytest.fail(f"job ended before serving:\n{logs[-4000:]}")
        if re.search(r"^\s+stop\s", logs, re.M):
            return {"grpc": re.search(r"grpc\s+(\S+)", logs).group(1),
                    "http": re.search(r"http\s+(\S+)/v1", logs).group(1)}
        return None

    return wait_until(printed, 180, "the job to print its endpoints", interval_s=1.0)


def test_submitted_job_serves_and_stops_cleanly(ray_head, tmp_path):
    client = ray_head["client"]
    (tmp_path / "spec.yaml").write_text(JOB_SPEC)

    def submit():
        try:
            return client.submit_job(entrypoint="partita serve --config spec.yaml",
                                     runtime_env={"working_dir": str(tmp_path),
                                                  "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}})
        except RuntimeError as e:  # the dashboard answers before its job agent is up: Ray says to retry
            if "No available agent" in str(e):
                return None
            raise

    job_id = wait_until(submit, 120, "the Ray job agent to accept the job", interval_s=2.0)
    try:
        endpoints = _endpoints(client, job_id)
        request = urllib.request.Request(
            endpoints["http"] + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 8

        from partita.client import Client

        with Client(endpoints["grpc"]) as grpc_client:
            assert grpc_client.generate("Hello", max_tokens=4, ignore_eos=True).usage.completion_tokens == 4

        status = subprocess.run([os.path.join(BIN, "partita"), "status", "--name", "job",
                                 "--address", ray_head["address"]],
                                capture_output=True, text=True, env=ray_head["env"], timeout=90)
        assert status.returncode == 0 and "p-0" in status.stdout, status.stderr
    finally:
        client.stop_job(job_id)
    wait_until(lambda: client.get_job_status(job_id).is_terminal(), 60, "the job to stop")
    assert "partita: shutting down" in client.get_job_logs(job_id)
    gone = subprocess.run([os.path.join(BIN, "partita"), "status", "--name", "job", "--address", ray_head["address"]],
                          capture_output=True, text=True, env=ray_head["env"], timeout=90)
    assert gone.returncode == 1 and "no deployment named 'job'" in gone.stderr

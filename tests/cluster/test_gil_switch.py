"""A worker's process hands the GIL over at the shortened switch interval (cluster/gil_switch.py), from the moment
the worker is built; other processes keep the interpreter's default."""
import json
import subprocess
import sys

from partita.cluster.gil_switch import SWITCH_INTERVAL_S

_BUILD_WORKER = """
import json, sys
from partita.cluster.worker_actor import WorkerActor
before = sys.getswitchinterval()
WorkerActor("w-0", "p", "colocated", {"preset": "tiny-llama"},
            {"max_model_len": 64, "kv_cache_memory_bytes": 1 << 20}, "cpu")
print(json.dumps([before, sys.getswitchinterval()]))
"""


def test_building_a_worker_shortens_its_process_switch_interval():
    run = subprocess.run([sys.executable, "-c", _BUILD_WORKER], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = json.loads(run.stdout.strip().splitlines()[-1])
    assert before == 0.005  # CPython's default: importing partita changes nothing
    assert after == SWITCH_INTERVAL_S < before

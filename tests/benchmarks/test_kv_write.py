"""benchmarks/kv_write.py on the CPU (Triton interpreted, tiny sizes): both write paths run over the chunks
`send_kv` would send, kivi2's residual state included, and leave byte-equal caches (the script fails otherwise)."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_write.py"


def run(*args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_both_paths_write_the_same_cache(tmp_path):
    out = tmp_path / "kw.md"
    done = run("--tokens", "40", "--chunk-kib", "256", "--rounds", "2", "--formats", "int4,kivi2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| int4 |", "| kivi2 |"))]
    assert [r.split("|")[1:3] for r in rows] == [[" int4 ", " torch "], [" int4 ", " triton "],
                                                 [" kivi2 ", " torch "], [" kivi2 ", " triton "]]
    assert all(int(r.split("|")[3]) > 1 for r in rows)  # several chunks, so runs cross layers


def test_cpu_without_the_interpreter_is_refused():
    done = run("--rounds", "2", interpret=False)
    assert done.returncode == 2 and "TRITON_INTERPRET=1" in done.stderr

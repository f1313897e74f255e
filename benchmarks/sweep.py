"""Compare deployments on the same GPUs: the same seeded traffic at the same request rates against each,
one after another, and one table.

    python benchmarks/sweep.py --output-dir out/ --request-rate 1 2 4 8 inf --num-requests 200 \
        --goodput ttft:500 tpot:50 --input-len 1024 --output-len 256 \
        --deployment 'colocated=--model llama3-8b --data-parallel-size 2 --gpus-per-worker 1' \
        --deployment 'pd=--config deploy/specs/llama3-8b-pd.yaml' \
        --deployment 'running=http://10.0.0.5:8000'

A deployment is NAME=URL (an endpoint already running: http(s)://, grpc(s)://) or NAME=ARGS, the arguments
of a `partita serve` that this script starts (on free ports unless ARGS name them), benchmarks once its
endpoints are printed, and stops with Ctrl-C (SIGINT) before the next one starts. A deployment that does not
start (a role not implemented yet, say) gets a row saying why; the others still run. Every other flag is
the serving benchmark's (cluster/bench_cli.py) and applies to all deployments.

Writes to --output-dir: sweep.md (the table, also printed last), sweep.json (every summary), NAME.json and
NAME-*.png per deployment (benchmarks/serving.py), sweep-rates.png (throughput, goodput and latencies against
the offered rate, one line per deployment) and sweep-latency-cdf.png (each deployment at its highest rate).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from partita.cluster.bench_cli import add_bench_arguments

if __package__:
    from . import serving
else:
    import serving

URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """name: its label in the table; url: an endpoint already running, or serve_args: `partita serve` arguments."""

    name: str
    url: str | None = None
    serve_args: tuple[str, ...] = ()


def parse_deployment(text: str) -> Deployment:
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--deployment {text!r}: expected NAME=URL or NAME=SERVE-ARGS, NAME of letters, digits, "
                         "'.', '_' and '-'")
    if value.lower().startswith(URL_SCHEMES):
        return Deployment(name, url=value)
    return Deployment(name, serve_args=tuple(shlex.split(value)))


class ServeProcess:
    """`partita serve ARGS` in a subprocess: waits for its endpoints, stops it with SIGINT (then harder)."""

    def __init__(self, args: tuple[str, ...], log_path: str, start_timeout_s: float, stop_timeout_s: float = 90.0):
        flags = set(a.split("=", 1)[0] for a in args)
        ports = [f for p in ("--http-port", "--grpc-port") if p not in flags for f in (p, "0")]
        self.command = [sys.executable, "-m", "partita.cluster.cli", "serve", *args, *ports]
        self._log_path, self._start_timeout_s, self._stop_timeout_s = log_path, start_timeout_s, stop_timeout_s
        self._lines: queue.Queue = queue.Queue()
        self._proc: subprocess.Popen | None = None

    def start(self) -> dict[str, str]:
        """Starts it and returns {"http": base URL, "grpc": host:port}; RuntimeError with its log if it fails."""
        self._log = open(self._log_path, "a")
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._pump, daemon=True).start()
        deadline, seen = time.monotonic() + self._start_timeout_s, []
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self._proc.poll() is not None and self._lines.empty():
                    break
                continue
            if line is None:  # stdout closed: the server is exiting
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(10)
                break
            seen.append(line)
            if line.strip().startswith("stop"):
                text = "".join(seen)
                return {"grpc": re.search(r"grpc\s+(\S+)", text).group(1),
                        "http": re.search(r"http\s+(\S+)/v1", text).group(1)}
        running = self._proc.poll() is None
        self.stop()
        why = (f"printed no endpoints in {self._start_timeout_s:g} s" if running else
               f"exited {self._proc.returncode} before printing its endpoints")
        raise RuntimeError(f"partita serve {why}: {self.log_tail()}")

    def _pump(self) -> None:
        """Copies the server's stdout into the queue and the log until it exits (then closes the log)."""
        for line in self._proc.stdout:
            self._lines.put(line)
            self._log.write(line)
            self._log.flush()
        self._log.close()
        self._lines.put(None)

    def log_tail(self, num_lines: int = 8) -> str:
        with open(self._log_path) as f:
            lines = [line.rstrip() for line in f if line.strip()]
        return " | ".join(lines[-num_lines:])

    def stop(self) -> int | None:
        if self._proc is None:
            return None
        for sig, wait_s in ((signal.SIGINT, self._stop_timeout_s), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(self._proc.pid, sig)  # its own session: only what it started
                else:
                    self._proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(wait_s)
        return self._proc.returncode


def run_deployment(deployment: Deployment, config, output_dir: str, serve_timeout_s: float) -> dict:
    """The serving benchmark against one deployment: its result, or {"label", "error"}."""
    server = None
    try:
        url = deployment.url
        if url is None:
            server = ServeProcess(deployment.serve_args, os.path.join(output_dir, f"{deployment.name}-serve.log"),
                                  serve_timeout_s)
            endpoints = server.start()
            url = f"grpc://{endpoints['grpc']}" if config.backend == "grpc" else endpoints["http"]
        print(f"sweep: {deployment.name} at {url}", flush=True)
        return asyncio.run(serving.benchmark(dataclasses.replace(config, url=url, label=deployment.name)))
    except Exception as e:  # noqa: BLE001 - one deployment failing must not stop the comparison
        print(f"sweep: {deployment.name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return {"label": deployment.name, "error": f"{type(e).__name__}: {e}", "runs": []}
    finally:
        if server is not None:
            server.stop()


def _ms(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def sweep_table(results: list[dict], config) -> str:
    """One markdown table: a row per deployment and rate; the ratio column compares output tokens/s with the
    first deployment at the same rate."""
    baseline = {run["request_rate"]: run["summary"]["output_throughput"]
                for run in (results[0]["runs"] if results else [])}
    goodput = " ".join(f"{k}<={v:g}ms" for k, v in config.goodput_ms.items()) or "none"
    q = max(config.percentiles)
    base_label = results[0]["label"] if results else ""
    lines = [f"traffic: {config.num_requests} requests, prompt {config.input_len.kind} {config.input_len.mean} "
             f"(+{config.prefix_len} shared), output {config.output_len.kind} {config.output_len.mean}, seed "
             f"{config.seed}, burstiness {config.burstiness:g}, max concurrency {config.max_concurrency or '-'}; "
             f"goodput targets: {goodput}", "",
             f"| deployment | rate req/s | done | failed | req/s | goodput req/s | out tok/s | x {base_label} "
             f"| TTFT p50 ms | TTFT p{q:g} ms | TPOT p50 ms | TPOT p{q:g} ms | ITL p{q:g} ms | ITL1 p50 ms | E2E p50 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        if result.get("error"):
            lines.append(f"| {result['label']} | did not run: {result['error'][:300].replace('|', '/')} |"
                         + " |" * 13)
            continue
        for run in result["runs"]:
            s, rate = run["summary"], run["request_rate"]
            base = baseline.get(rate)
            ratio = f"{s['output_throughput'] / base:.2f}" if base else "-"
            good = "-" if s.get("request_goodput") is None else f"{s['request_goodput']:.2f}"
            lines.append(f"| {result['label']} | {rate:g} | {s['completed']} | {s['failed']} | "
                         f"{s['request_throughput']:.2f} | {good} | {s['output_throughput']:.1f} | {ratio} | "
                         f"{_ms(s['median_ttft_ms'])} | {_ms(s[f'p{q:g}_ttft_ms'])} | {_ms(s['median_tpot_ms'])} | "
                         f"{_ms(s[f'p{q:g}_tpot_ms'])} | {_ms(s[f'p{q:g}_itl_ms'])} | {_ms(s['median_itl1_ms'])} | "
                         f"{_ms(s['median_e2el_ms'])} |")
    return "\n".join(lines)


def write_sweep(results: list[dict], config, output_dir: str) -> str:
    """sweep.json, sweep.md, per-deployment files and the comparison plots; returns the table."""
    table = sweep_table(results, config)
    with open(os.path.join(output_dir, "sweep.md"), "w") as f:
        f.write(f"# Serving sweep, {time.strftime('%Y-%m-%d %H:%M')}\n\n{table}\n")
    ran = [r for r in results if not r.get("error")]
    summary = [{"label": r["label"], "error": r.get("error"),
                "runs": [{"request_rate": run["request_rate"], "summary": run["summary"],
                          "server_counters": run.get("server_counters")} for run in r["runs"]]} for r in results]
    with open(os.path.join(output_dir, "sweep.json"), "w") as f:
        json.dump(serving._jsonable({"config": dataclasses.asdict(config) | {"api_key": None}, "deployments": summary}),
                  f, indent=1)
    for result in ran:
        serving.write_outputs(result, output_dir, config.plots)
    if config.plots and ran:
        if __package__:
            from . import serving_plots as plotting
        else:
            import serving_plots as plotting
        if plotting.matplotlib_available():
            plotting.plot_rate_sweep({r["label"]: [(run["request_rate"], run["summary"]) for run in r["runs"]]
                                      for r in ran}, os.path.join(output_dir, "sweep-rates.png"), "deployments")
            plotting.plot_latency_cdfs([(f"{r['label']} @ {r['runs'][-1]['request_rate']:g} req/s",
                                         r["runs"][-1]["_records"]) for r in ran if r["runs"]],
                                       os.path.join(output_dir, "sweep-latency-cdf.png"), "deployments")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployment", action="append", required=True, metavar="NAME=URL|NAME=SERVE-ARGS",
                        help="a deployment to compare (repeat); the first is the baseline of the ratio column")
    parser.add_argument("--serve-timeout-s", type=float, default=900.0,
                        help="how long a started `partita serve` may take to print its endpoints")
    add_bench_arguments(parser, with_url=False)
    args = parser.parse_args(argv)
    try:
        deployments = [parse_deployment(d) for d in args.deployment]
        config = serving.config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if len({d.name for d in deployments}) != len(deployments):
        parser.error("--deployment names must differ")
    output_dir = args.output_dir or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(output_dir, exist_ok=True)
    config = dataclasses.replace(config, output_dir=output_dir)
    results = [run_deployment(d, config, output_dir, args.serve_timeout_s) for d in deployments]
    table = write_sweep(results, config, output_dir)
    print(f"\nwrote {output_dir}/sweep.md, sweep.json\n\n{table}")
    return 0 if all(not r.get("error") and r["runs"] and all(run["summary"]["completed"] for run in r["runs"])
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

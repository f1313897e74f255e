"""`partita bench`: load a running partita endpoint and report latency, throughput and goodput.

    partita bench --url http://127.0.0.1:8000 --num-requests 200 --request-rate 4 --output-dir results/
    partita bench --url grpc://127.0.0.1:50051 --request-rate 1 2 4 8 inf --goodput ttft:500 tpot:50 \
                  --input-len 512 --output-len 128 --length-dist lognormal --prefix-len 256 --output-dir out/

Flags follow `vllm bench serve` where they mean the same thing. The harness itself lives in the source
checkout's `benchmarks/serving.py` (also runnable as `python benchmarks/serving.py ...` with these flags);
this module defines the flags and finds the harness.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import types
from pathlib import Path

HARNESS_PACKAGE = "_partita_benchmarks"


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return value


DEFAULT_URL = "http://127.0.0.1:8000"


def add_bench_arguments(p: argparse.ArgumentParser, with_url: bool = True) -> None:
    """The benchmark's flags, shared by `partita bench`, benchmarks/serving.py and benchmarks/sweep.py (which
    names its endpoints with --deployment instead of --url)."""
    g = p.add_argument_group("endpoint")
    if with_url:
        g.add_argument("--url", default=DEFAULT_URL, help="http(s)://HOST:PORT (OpenAI API, SSE) or "
                                                          f"grpc(s)://HOST:PORT (the SDK); default {DEFAULT_URL}")
    g.add_argument("--backend", choices=("http", "grpc"), help="default: from the URL's scheme")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--model", help="model name in requests (default: the one the endpoint serves)")
    g.add_argument("--metrics-url", help="a /metrics URL to read the server's counters from (default: URL/metrics "
                                         "for http)")
    g = p.add_argument_group("load")
    g.add_argument("--num-requests", "--num-prompts", type=int, default=100, dest="num_requests")
    g.add_argument("--request-rate", type=_rate, nargs="+", default=[math.inf], metavar="RATE",
                   help="requests/s offered; several values run one after another (a rate sweep); inf sends "
                        "all at once (default)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson (default), <1 burstier, >1 steadier")
    g.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: unbounded)")
    g.add_argument("--num-warmups", type=int, default=1,
                   help="requests sent and awaited before the timed run (the first one must succeed)")
    g.add_argument("--request-timeout-s", type=float, default=600.0, help="a request taking longer fails")
    g = p.add_argument_group("traffic (seeded: the same flags send the same requests to any deployment)")
    g.add_argument("--input-len", "--random-input-len", type=int, default=256, dest="input_len",
                   help="prompt tokens per request, beyond the shared prefix (the mean if not fixed)")
    g.add_argument("--output-len", "--random-output-len", type=int, default=128, dest="output_len",
                   help="output tokens per request (exact with ignore_eos; the mean if not fixed)")
    g.add_argument("--length-dist", choices=("fixed", "uniform", "lognormal"),
                   help="length distribution of prompts and outputs (default: uniform if --range-ratio > 0, "
                        "else fixed); lognormal is shaped like chat traffic")
    g.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0, dest="range_ratio",
                   help="uniform lengths in [len * (1 - r), len * (1 + r)]")
    g.add_argument("--lognormal-sigma", type=float, default=1.0, help="log-space std of lognormal lengths")
    g.add_argument("--prefix-len", "--random-prefix-len", type=int, default=0, dest="prefix_len",
                   help="token ids shared by every prompt, before its own (prefix caching)")
    g.add_argument("--vocab-size", type=int,
                   help="prompt ids are drawn below it (default: the served preset's, or --tokenizer's)")
    g.add_argument("--tokenizer", help="checkpoint or tokenizer directory (config.json vocab_size or "
                                       "tokenizer.json) that bounds prompt token ids")
    g.add_argument("--min-token-id", type=int, default=0, help="smallest prompt token id drawn")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--no-ignore-eos", action="store_false", dest="ignore_eos",
                   help="let eos end requests early (output lengths then vary)")
    g.add_argument("--extra-body", help="JSON merged into every request body (gRPC: SDK sampling fields)")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                   help="service targets for goodput: ttft:MS tpot:MS e2el:MS (any of them)")
    g.add_argument("--percentiles", default="90,99", help="comma-separated percentiles besides the median")
    g.add_argument("--output-dir", help="write LABEL.json and PNG plots here")
    g.add_argument("--label", help="name of this run in files and tables (default: the model)")
    g.add_argument("--save-detailed", action="store_true", help="also save every chunk's arrival time")
    g.add_argument("--no-plots", action="store_false", dest="plots", help="write no PNG plots")
    g.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` to the `partita` command's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark a running endpoint: TTFT, TPOT, ITL, E2E, goodput",
                              description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return p


def load_harness() -> types.ModuleType:
    """benchmarks/serving.py of the source checkout this package was installed from (`pip install -e .`),
    imported as a package so that its helpers (benchmarks/serving_*.py) resolve beside it."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (folder / "serving.py").is_file():
        raise RuntimeError(f"partita bench needs the source checkout's benchmarks/serving.py (looked in {folder}); "
                           "install partita with `pip install -e .` from a checkout")
    package = sys.modules.get(HARNESS_PACKAGE)
    if package is None:
        package = types.ModuleType(HARNESS_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[HARNESS_PACKAGE] = package
    return importlib.import_module(f"{HARNESS_PACKAGE}.serving")


def run_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark the parsed flags describe; 0 when every run completed a request, 1 otherwise,
    2 for flags that cannot be used."""
    try:
        harness = load_harness()
        config = harness.config_from_args(args)
    except (RuntimeError, ValueError) as e:
        print(f"partita bench: error: {e}", file=sys.stderr)
        return 2
    return harness.run(config)

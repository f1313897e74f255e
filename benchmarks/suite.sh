#!/usr/bin/env bash
# partita's benchmark suite: one command on a GPU machine, a results file in benchmarks/results/.
#
#   benchmarks/suite.sh                       # install, then every benchmark at full size
#   benchmarks/suite.sh --quick               # smaller sizes (each step a few minutes at most)
#   benchmarks/suite.sh --quick --only moe,serving --step-timeout 400
#   benchmarks/suite.sh --skip-install --python /work/venv/bin/python --only serving,gateway   # CPU: no GPU steps
#   options: --results-dir DIR (default benchmarks/results)
#
# 1. installs the carried wheels (.whl/, made by ../shared/tools/device-wheels: Ray and friends) into
#    /tmp/site and the project in editable mode (--skip-install skips both);
# 2. runs each step that exists, each bounded by --step-timeout (Ctrl-C first, then a kill), skipping with a
#    reason a step whose file, GPU or Ray is missing:
#      offline    benchmarks/offline_throughput.py   partita vs HF transformers decode throughput (GPU)
#      moe        benchmarks/moe.py                  fused MoE kernel vs torch (GPU)
#      attention  benchmarks/attention.py            paged decode attention per KV format (GPU)
#      decode     benchmarks/decode_kernels.py       decode-step kernels vs cuBLAS / torch (GPU)
#      transfer   benchmarks/kv_transfer.py          KV migration, when that benchmark exists
#      write      benchmarks/kv_write.py             the decode side's KV write per received chunk (GPU)
#      export     benchmarks/kv_export.py            the prefill side's KV export to host memory (GPU)
#      transport  deploy/ray/stream_transport_bench.py  token streams over Ray vs gRPC (Ray)
#      gateway    benchmarks/gateway.py              gateway overhead vs the engine alone
#      serving    benchmarks/sweep.py                `partita serve` deployments on all GPUs (colocated replicas;
#                                                    a PD row: prefill and decode GPUs when there are >= 2, int4 KV
#                                                    over gRPC beside colocated int4, both roles sharing the GPU when
#                                                    there is one; AFD joins when its roles land) under the same
#                                                    seeded traffic at several rates (Ray)
# 3. writes benchmarks/results/<date>-<device>.md (a section per step: command, status, its table) with the
#    raw logs, JSON and plots in benchmarks/results/<date>-<device>/, and prints a short table last.
#    Sections accumulate: running --only a,b then --only c on the same day and device gives one file.
#    With $OUT set (the lent GPU machines), the .md and a .tar.gz of the raw folder are copied there.
set -uo pipefail

QUICK=0 ONLY="" INSTALL=1 PY=python3 STEP_TIMEOUT="" RESULTS_DIR=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --only) ONLY=",$2,"; shift ;;
    --skip-install) INSTALL=0 ;;
    --python) PY=$2; shift ;;
    --step-timeout) STEP_TIMEOUT=$2; shift ;;
    --results-dir) RESULTS_DIR=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$STEP_TIMEOUT" ] || STEP_TIMEOUT=$([ $QUICK = 1 ] && echo 420 || echo 3600)
cd "$(dirname "$0")/.."

# --- 1. install ----------------------------------------------------------------------------------------------
if [ $INSTALL = 1 ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
    echo "suite.sh: installing partita failed" >&2; exit 1
  fi
fi

# --- the machine ---------------------------------------------------------------------------------------------
read -r NUM_GPUS DEVICE DEVICE_NAME < <("$PY" - <<'EOF'
import re, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    n = torch.cuda.device_count()
    short = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    print(n, short + (f"-x{n}" if n > 1 else ""), name.replace(" ", "_"))
else:
    print(0, "cpu", "CPU")
EOF
)
DATE=$(date +%Y-%m-%d)
RESULTS=$RESULTS_DIR/$DATE-$DEVICE.md
RAW=$RESULTS_DIR/$DATE-$DEVICE
mkdir -p "$RAW"
HAS_RAY=$("$PY" -c "import ray" 2>/dev/null && echo 1 || echo 0)
HAS_HF=$("$PY" -c "import transformers" 2>/dev/null && echo 1 || echo 0)
echo "suite: $DEVICE_NAME x$NUM_GPUS ($DEVICE), quick=$QUICK, step timeout ${STEP_TIMEOUT}s, results in $RESULTS"

# --- steps ---------------------------------------------------------------------------------------------------
wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
has_flag() { grep -q -- "\"$2\"" "$1"; }  # a benchmark's argparse knows the flag (files change under us)

# record NAME STATUS SECONDS COMMAND: a line of steps.tsv (the latest line per step wins)
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW/steps.tsv"; }

skip() {  # skip NAME REASON
  wanted "$1" || return 0
  echo "suite: $1 skipped: $2"
  record "$1" "skipped: $2" 0 "-"
  printf '## %s\n\nskipped: %s\n' "$1" "$2" >"$RAW/$1.section.md"
}

# run_step NAME TABLE_FILE COMMAND...: runs it bounded, then writes its section (TABLE_FILE if the step wrote
# one, else the markdown table lines of its output, else the output's tail)
run_step() {
  local name=$1 table=$2; shift 2
  wanted "$name" || return 0
  local log="$RAW/$name.log" start=$SECONDS rc status cmd
  cmd=$(printf '%q ' "$@")
  echo "suite: $name: $cmd"
  timeout --signal=INT --kill-after=60 "$STEP_TIMEOUT" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124) status="timed out after ${STEP_TIMEOUT}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  local seconds=$((SECONDS - start))
  echo "suite: $name: $status in ${seconds}s"
  record "$name" "$status" "$seconds" "${cmd% }"
  {
    printf '## %s\n\n- command: `%s`\n- status: %s, %ss\n\n' "$name" "${cmd% }" "$status" "$seconds"
    if [ -n "$table" ] && [ -s "$table" ]; then
      sed 's/^# /### /' "$table"
    elif grep -q '^|' "$log"; then
      grep '^|' "$log"
    else
      printf '```\n'; tail -n 15 "$log"; printf '```\n'
    fi
    if [ "$status" != ok ] && [ -n "$table" ] && [ -s "$table" ]; then
      printf '\nlast lines:\n```\n'; tail -n 8 "$log"; printf '```\n'
    fi
  } >"$RAW/$name.section.md"
}

gpu_step() {  # gpu_step NAME FILE TABLE ARGS...: a step that needs CUDA and its file
  local name=$1 file=$2 table=$3; shift 3
  wanted "$name" || return 0
  if [ ! -f "$file" ]; then skip "$name" "$file does not exist"; return 0; fi
  if [ "$NUM_GPUS" = 0 ]; then skip "$name" "needs a CUDA GPU"; return 0; fi
  run_step "$name" "$table" "$PY" "$file" "$@"
}

# offline throughput: partita vs HF transformers
args=(--json "$RAW/offline.json")
[ $QUICK = 1 ] && args+=(--models llama3-8b --batch-sizes 1 32)
{ [ $QUICK = 1 ] || [ "$HAS_HF" = 0 ]; } && args+=(--skip-hf)
gpu_step offline benchmarks/offline_throughput.py "" "${args[@]}"

# kernels
args=()
has_flag benchmarks/moe.py --markdown && args+=(--markdown "$RAW/moe.md")
[ $QUICK = 1 ] && args+=(--tokens 1 32 1024)
gpu_step moe benchmarks/moe.py "$RAW/moe.md" "${args[@]}"
args=()
has_flag benchmarks/attention.py --md && args+=(--md "$RAW/attention.md")
has_flag benchmarks/attention.py --json && args+=(--json "$RAW/attention.json")
[ $QUICK = 0 ] && has_flag benchmarks/attention.py --sweep && args+=(--sweep)
gpu_step attention benchmarks/attention.py "$RAW/attention.md" "${args[@]}"
args=()
has_flag benchmarks/decode_kernels.py --out && args+=(--out "$RAW/decode")
[ $QUICK = 1 ] && args+=(--ms 1 8 32)
gpu_step decode benchmarks/decode_kernels.py "" "${args[@]}"

# transfers
if [ -f benchmarks/kv_transfer.py ]; then gpu_step transfer benchmarks/kv_transfer.py ""
else skip transfer "no KV-transfer benchmark yet (benchmarks/kv_transfer.py)"; fi
args=(--out "$RAW/kv_write.md"); [ $QUICK = 1 ] && args+=(--rounds 4)
gpu_step write benchmarks/kv_write.py "$RAW/kv_write.md" "${args[@]}"
args=(--out "$RAW/kv_export.md"); [ $QUICK = 1 ] && args+=(--rounds 4)
gpu_step export benchmarks/kv_export.py "$RAW/kv_export.md" "${args[@]}"
if [ "$HAS_RAY" = 0 ]; then skip transport "Ray is not importable (carry .whl/ from ../shared/tools/device-wheels)"
elif [ -f deploy/ray/stream_transport_bench.py ]; then
  args=(--json "$RAW/transport.json"); [ $QUICK = 1 ] && args+=(--repeats 1)
  run_step transport "" "$PY" deploy/ray/stream_transport_bench.py "${args[@]}"
fi

# gateway overhead
args=(--output "$RAW/gateway.json")
[ $QUICK = 1 ] && args+=(--repeats 1)
[ "$NUM_GPUS" != 0 ] && args+=(--device cuda)
if [ -f benchmarks/gateway.py ]; then run_step gateway "" "$PY" benchmarks/gateway.py "${args[@]}"
else skip gateway "benchmarks/gateway.py does not exist"; fi

# serving: deployments on the same GPUs, the same traffic
if [ "$HAS_RAY" = 0 ]; then
  skip serving "Ray is not importable (carry .whl/ from ../shared/tools/device-wheels)"
else
  if [ "$NUM_GPUS" = 0 ]; then
    model=tiny-moe; placement=(--gpus-per-worker 0); replicas=2; max_len=512
    load=(--num-requests 40 --request-rate 4 16 inf --input-len 64 --output-len 32 --goodput ttft:1000 tpot:100)
  else
    model=llama3-8b; placement=(--gpus-per-worker 1 --dtype bfloat16); replicas=$NUM_GPUS; max_len=4096
    if [ $QUICK = 1 ]; then
      load=(--num-requests 96 --request-rate 4 16 inf --input-len 1024 --output-len 128 --range-ratio 0.5)
    else
      load=(--num-requests 400 --request-rate 2 4 8 16 32 inf --input-len 1024 --output-len 256 --range-ratio 0.5)
    fi
    load+=(--goodput ttft:500 tpot:50 --num-warmups 4)  # DESIGN's SLO example; warm-ups: autotune, graphs
  fi
  colocated="--model $model ${placement[*]} --data-parallel-size $replicas --max-model-len $max_len"
  deployments=(--deployment "colocated=$colocated")
  # an AFD deployment joins here when the attention and ffn roles land
  if [ "$NUM_GPUS" -ge 2 ]; then  # the same GPUs split into roles; rows say why when this build refuses them
    # between GPUs the KV crosses gRPC, where bf16's 128 KiB a token caps what PD sustains (results of
    # 2026-12-07, pd-quantized-kv): the PD row moves int4, as deploy/specs/llama3-8b-pd.yaml does, beside a
    # colocated int4 row
    deployments+=(--deployment "colocated-int4=$colocated --kv-cache-dtype int4")
    cat >"$RAW/pd.yaml" <<EOF
name: suite-pd
model: {preset: $model, dtype: bfloat16, kv_format: int4}
pools:
  - {name: prefill, role: prefill, replicas: 1, gpus_per_worker: 1}
  - {name: decode, role: decode, replicas: $((NUM_GPUS - 1)), gpus_per_worker: 1}
scheduler: {max_model_len: $max_len}
EOF
    deployments+=(--deployment "pd=--config $RAW/pd.yaml")
  elif [ "$NUM_GPUS" = 1 ]; then  # semi-PD: a prefill and a decode worker sharing the one GPU, half its memory each
    cat >"$RAW/pd.yaml" <<EOF
name: suite-pd
model: {preset: $model, dtype: bfloat16}
pools:
  - {name: prefill, role: prefill, replicas: 1, gpus_per_worker: 0.5}
  - {name: decode, role: decode, replicas: 1, gpus_per_worker: 0.5}
scheduler: {max_model_len: $max_len}
EOF
    deployments+=(--deployment "pd-shared-gpu=--config $RAW/pd.yaml")
  fi
  run_step serving "$RAW/serving/sweep.md" "$PY" benchmarks/sweep.py --output-dir "$RAW/serving" --no-progress \
    "${load[@]}" "${deployments[@]}"
fi

# --- 3. the results file and the short table -------------------------------------------------------------------
"$PY" - "$RAW" "$RESULTS" "$DEVICE_NAME" "$NUM_GPUS" <<'EOF'
"""Joins the step sections into the results file and prints the short table, with a headline figure for the
steps whose JSON it knows."""
import csv, json, os, platform, subprocess, sys, time

raw, results, device, num_gpus = sys.argv[1], sys.argv[2], sys.argv[3].replace("_", " "), int(sys.argv[4])
ORDER = ["offline", "moe", "attention", "decode", "transfer", "write", "transport", "gateway", "serving"]


def load(name):
    try:
        with open(os.path.join(raw, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def headline(step):
    if step == "offline" and load("offline.json"):
        best = {}
        for r in load("offline.json")["rows"]:
            if r["model"] not in best or r["tok_s"] > best[r["model"]]["tok_s"]:
                best[r["model"]] = r
        return "; ".join(f"{m} bsz{r['batch']} {r['tok_s']:.0f} tok/s ({r['roofline_frac']:.0%} roofline)"
                         for m, r in best.items())
    if step == "gateway" and load("gateway.json"):
        modes = load("gateway.json")["modes"]
        parts = []
        for key, m in modes.items():
            mode, n = key.split("/")
            base = modes.get(f"engine/{n}")
            if mode in ("grpc", "http") and base:
                parts.append(f"{key} {m['tokens_per_s'] / base['tokens_per_s'] - 1:+.0%} vs engine")
        return "; ".join(parts)
    if step == "serving" and load("serving/sweep.json"):
        parts = []
        for d in load("serving/sweep.json")["deployments"]:
            if d["error"] or not d["runs"]:
                parts.append(f"{d['label']}: did not run")
                continue
            s = d["runs"][-1]["summary"]
            num = {k: float("nan") if v is None else v for k, v in s.items()}  # null: no sample
            good = f", goodput {s['request_goodput']:.2f} req/s" if s.get("request_goodput") is not None else ""
            parts.append(f"{d['label']} @ {d['runs'][-1]['request_rate']} req/s: {num['output_throughput']:.0f} "
                         f"tok/s{good}, TTFT p99 {num['p99_ttft_ms']:.0f} ms, TPOT p99 {num['p99_tpot_ms']:.1f} ms")
        return "; ".join(parts)
    return "see its section" if os.path.exists(os.path.join(raw, f"{step}.section.md")) else ""


steps = {}
if os.path.exists(os.path.join(raw, "steps.tsv")):
    with open(os.path.join(raw, "steps.tsv")) as f:
        for name, status, seconds, command in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            steps[name] = (status, seconds)
rows = [(s, *steps[s], headline(s) if steps[s][0] == "ok" else "") for s in ORDER if s in steps]
rows += [(s, *steps[s], "") for s in steps if s not in ORDER]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
try:
    import torch
    versions = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    import triton
    versions += f", triton {triton.__version__}"
except ImportError:
    pass
table = ["| step | status | seconds | headline |", "| --- | --- | ---: | --- |"]
table += [f"| {name} | {status} | {seconds} | {line} |" for name, status, seconds, line in rows]
with open(results, "w") as f:
    f.write(f"# Benchmark suite: {device} x{num_gpus}, {time.strftime('%Y-%m-%d')}\n\n"
            f"- command: `benchmarks/suite.sh` (steps below; raw logs, JSON and plots in `{raw}/`)\n"
            f"- commit {commit or '?'}, {versions}, Python {platform.python_version()}, {platform.node()}\n\n"
            + "\n".join(table) + "\n\n")
    for step in ORDER + [s for s in steps if s not in ORDER]:
        path = os.path.join(raw, f"{step}.section.md")
        if os.path.exists(path):
            with open(path) as section:
                f.write(section.read().rstrip() + "\n\n")
print(f"\nsuite: wrote {results}\n")
print("\n".join(table))
EOF

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$RESULTS" "$OUT/" && tar -czf "$OUT/$DATE-$DEVICE.tar.gz" -C "$RESULTS_DIR" "$DATE-$DEVICE"
fi

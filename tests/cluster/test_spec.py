"""The cluster spec: loading, validation errors named by path, overrides, environment, example files."""
from __future__ import annotations

import glob
import os

import pytest

from partita.cluster.spec import (ClusterSpec, ModelSpec, PoolSpec, SpecError, apply_overrides, env_overrides,
                                  load_spec)
from partita.cluster.worker_actor import check_runnable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "deploy", "specs", "*.yaml")))


def error_of(data) -> SpecError:
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_dict(data)
    return info.value


def test_defaults_are_the_embedded_deployment():
    spec = ClusterSpec.from_dict({})
    assert spec.model == ModelSpec(preset="tiny-moe")
    assert spec.pools == (PoolSpec(name="default"),)
    assert spec.pools[0].role == "colocated" and spec.pools[0].gpus_per_worker is None
    check_runnable(spec)


def test_round_trip_through_plain_data():
    spec = ClusterSpec.from_dict({"name": "x", "model": "tiny-llama",
                                  "pools": [{"name": "a", "replicas": 3}, {"name": "b", "gpus_per_worker": 2,
                                                                           "tensor_parallel_size": 2}],
                                  "slo": {"ttft_ms": 500}, "gateway": {"http_port": 0}})
    assert spec.model.preset == "tiny-llama"
    assert ClusterSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("data, path, words", [
    ({"pools": [{"name": "a"}, {"name": "b", "replicas": -1}]}, "pools[1].replicas", ">= 0, got -1"),
    ({"pools": [{"name": "a", "replica": 2}]}, "pools[0].replica", "unknown key"),
    ({"scheduler": {"max_num_seq": 2}}, "scheduler.max_num_seq", "known keys here: max_num_seqs"),
    ({"sheduler": {}}, "sheduler", "unknown key"),
    ({"pools": [{"name": "a", "replicas": "two"}]}, "pools[0].replicas", "must be an integer, got 'two'"),
    ({"pools": [{"name": "a", "replicas": True}]}, "pools[0].replicas", "must be an integer"),
    ({"pools": [{"name": "a", "role": "prefil"}]}, "pools[0].role", "colocated, prefill, decode, attention, ffn"),
    ({"pools": [{"name": "Bad_Name"}]}, "pools[0].name", "lower-case"),
    ({"pools": [{"name": "a"}, {"name": "a"}]}, "pools[1].name", "already the name of pools[0]"),
    ({"pools": []}, "pools", "at least one pool"),
    ({"pools": {"name": "a"}}, "pools", "must be a list"),
    ({"pools": [{"name": "a", "gpus_per_worker": 3, "tensor_parallel_size": 2}]}, "pools[0].gpus_per_worker",
     "multiple of tensor_parallel_size"),
    ({"pools": [{"name": "a", "gpus_per_worker": 0, "tensor_parallel_size": 2}]}, "pools[0].tensor_parallel_size",
     "needs GPUs"),
    ({"pools": [{"name": "a", "gpus_per_worker": 0.5, "tensor_parallel_size": 2}]}, "pools[0].gpus_per_worker",
     "cannot hold tensor_parallel_size=2"),
    ({"pools": [{"name": "a", "gpus_per_worker": 1.5}]}, "pools[0].gpus_per_worker", "whole number"),
    ({"model": {"preset": "tiny-moe", "path": "/m"}}, "model.preset", "only one"),
    ({"model": {"seed": 1}}, "model", "model.path"),
    ({"model": {"preset": "gpt-5"}}, "model.preset", "tiny-llama, tiny-moe"),
    ({"model": {"preset": "tiny-moe", "dtype": "fp8"}}, "model.dtype", "bfloat16"),
    ({"model": {"preset": "tiny-moe", "kv_format": "int3"}}, "model.kv_format", "int4"),
    ({"scheduler": {"block_size": 24}}, "scheduler.block_size", "power of two"),
    ({"scheduler": {"gpu_memory_utilization": 1.5}}, "scheduler.gpu_memory_utilization", "(0, 1]"),
    ({"slo": {"tpot_ms": 0}}, "slo.tpot_ms", "> 0"),
    ({"controller": {"restart_backoff_s": 10, "restart_backoff_max_s": 1}}, "controller.restart_backoff_max_s",
     ">= restart_backoff_s"),
    ({"router": {"max_reruns": -1}}, "router.max_reruns", ">= 0"),
    ({"gateway": {"http_port": 70000}}, "gateway.http_port", "65535"),
    ({"gateway": {"grpc_port": 9000, "http_port": 9000}}, "gateway.http_port", "two ports"),
    ({"gateway": {"tls": True}}, "gateway.tls", "unknown"),
    ({"name": "My Cluster"}, "name", "lower-case"),
    ({"kv_transfer": {"auth_token": "short"}}, "kv_transfer.auth_token", "at least 16"),
    ({"kv_transfer": {"host": "a b"}}, "kv_transfer.host", "not an address"),
    ({"kv_transfer": {"port": 1}}, "kv_transfer.port", "unknown"),
    ({"kv_transfer": {"max_exports": 0}}, "kv_transfer.max_exports", "must be > 0"),
    ({"kv_transfer": {"max_exports": "4"}}, "kv_transfer.max_exports", "integer"),
])
def test_errors_name_the_path_the_value_and_what_is_allowed(data, path, words):
    error = error_of(data)
    assert error.path == path
    assert str(error).startswith(f"{path}: ")
    assert words in str(error)


def test_spec_valid_but_not_runnable_yet_names_the_path():
    spec = ClusterSpec.from_dict({"pools": [{"name": "a"}, {"name": "d", "role": "decode"}]})
    with pytest.raises(SpecError, match=r"pools\[1\].role: a decode pool needs a prefill pool beside it"):
        check_runnable(spec)
    check_runnable(ClusterSpec.from_dict({"pools": [{"name": "d", "role": "decode"}, {"name": "p", "role": "prefill"}]}))
    with pytest.raises(SpecError, match=r"pools\[0\].role: role 'attention' is not implemented yet"):
        check_runnable(ClusterSpec.from_dict({"pools": [{"name": "a", "role": "attention"}]}))
    for kv_format in ("int4", "kivi2", "int4:group_size=32"):
        check_runnable(ClusterSpec.from_dict({"model": {"preset": "tiny-moe", "kv_format": kv_format}}))


def test_file_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping at the top"):
        load_spec(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("pools:\n  - name: a\n  - name: b\n    gpus_per_worker: -2\n")
    with pytest.raises(SpecError, match=r"^pools\[1\].gpus_per_worker: must be >= 0, got -2$"):
        load_spec(str(nested))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_specs_load(path):
    check_runnable(load_spec(path))


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"tiny-moe-cpu.yaml", "qwen3-30b-a3b.yaml"} <= names


def test_overrides_set_paths_and_every_pool():
    raw = {"model": "tiny-llama", "pools": [{"name": "a"}, {"name": "b"}]}
    out = apply_overrides(raw, {"pools[*].replicas": 3, "pools[1].cpus_per_worker": 2, "gateway.api_key": "k",
                                "model.seed": 7})
    spec = ClusterSpec.from_dict(out)
    assert [p.replicas for p in spec.pools] == [3, 3]
    assert spec.pools[1].cpus_per_worker == 2.0
    assert spec.gateway.api_key == "k" and spec.model == ModelSpec(preset="tiny-llama", seed=7)
    assert raw == {"model": "tiny-llama", "pools": [{"name": "a"}, {"name": "b"}]}  # input untouched
    assert ClusterSpec.from_dict(apply_overrides({}, {"pools[*].replicas": 2})).pools[0].replicas == 2
    with pytest.raises(SpecError, match=r"pools\[5\]"):
        apply_overrides(raw, {"pools[5].replicas": 1})


def test_environment_variables_mirror_the_tree():
    env = {"PARTITA_GATEWAY__API_KEY": "secret", "PARTITA_SCHEDULER__MAX_MODEL_LEN": "512",
           "PARTITA_POOLS__ALL__REPLICAS": "2", "PARTITA_POOLS__0__GPUS_PER_WORKER": "0",
           "PARTITA_LOG_LEVEL": "debug", "HOME": "/root"}
    overrides = env_overrides(env)
    assert overrides == {"gateway.api_key": "secret", "scheduler.max_model_len": 512, "pools[*].replicas": 2,
                         "pools[0].gpus_per_worker": 0}
    spec = ClusterSpec.from_dict(apply_overrides({}, overrides))
    assert spec.scheduler.max_model_len == 512 and spec.pools[0].replicas == 2
    with pytest.raises(SpecError, match="PARTITA_POOLS__REPLICAS"):
        env_overrides({"PARTITA_POOLS__REPLICAS": "2"})
    with pytest.raises(SpecError, match="scheduler.max_model_len: must be an integer"):
        ClusterSpec.from_dict(apply_overrides({}, env_overrides({"PARTITA_SCHEDULER__MAX_MODEL_LEN": "big"})))

"""PD disaggregation inside one process: prefill on one engine, move the KV bytes, decode on another.

Greedy output must equal the colocated engine's token for token, for every KV format (against a colocated
engine with the same format and the same prefill chunking: kivi2's results depend on chunking by design, see
tests/workers/attention/test_kv_formats_engine.py), and every block and sequence slot must return to the free
pool on both sides, through commit, abort and release alike.
"""
import threading

import numpy as np
import pytest
import torch

from partita.workers import Engine, EngineConfig, InvalidRequestError, SamplingParams
from partita.workers.engine.sequence import Status
from partita.workers.errors import KvCapacityError
from partita.workers.kv_import import import_payload, import_payloads
from partita.workers import kv_migration
from partita.kernels.scatter_copy import gather_copy_reference
from partita.workers.kv_migration import (EXPORT_STAGING_BYTES, KvLayoutMismatch, begin_export, cache_target,
                                         export_layer, export_pieces, export_plan, export_request, gather_in_pieces,
                                         kv_layout, request_rows, stream_layers)

FORMATS = ["none", "fp8", "int8", "int4", "kivi2"]
PROMPTS = [[(5 * i + 7 * j) % 500 + 2 for j in range(n)] for i, n in enumerate((3, 16, 45, 70))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_engine(kv_format: str = "none", model: str = "tiny-llama", device: str = "cpu", **config) -> Engine:
    # On a GPU each engine gets a small KV budget: with the default (90% of the GPU) this process would keep that
    # memory cached after the engine is gone, and the child processes of later tests would find none.
    memory = {"kv_cache_memory_bytes": 2**26} if device == "cuda" else {}
    config = {"max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 32, **memory, **config}
    return Engine(model, device=device, kv_format=kv_format, config=EngineConfig(**config))


def run_to_end(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def prefill(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams = GREEDY) -> int:
    engine.add_request(request_id, prompt, params, prefill_only=True)
    first = run_to_end(engine)[request_id]
    assert len(first) == 1 and not engine.has_unfinished()
    return first[0]


def cut_runs(payloads, bytes_per_block: int, num_blocks: int) -> list:
    """Each layer's run of blocks cut into runs of 1 and 2 blocks, last run first, as a sender's chunks may cut
    them (the state payloads are left out)."""
    runs = []
    for layer, index, data in payloads:
        start, count = 0, 1
        while index < num_blocks and start < len(data):
            end = min(start + count * bytes_per_block, len(data))
            runs.insert(0, (layer, index + start // bytes_per_block, data[start:end]))
            start, count = end, 3 - count
    return runs


def migrate(src: Engine, dst: Engine, request_id: str, params: SamplingParams = GREEDY, impl: str = "auto") -> None:
    export = export_request(src, request_id)
    kv_layout(dst).check_compatible(export.layout.to_proto())
    seq = dst.reserve_migrated(request_id, export.prompt_token_ids, params)
    num_blocks = export.layout.num_blocks(export.num_tokens)
    import_payloads(dst, seq, export.num_tokens, cut_runs(export.payloads, export.layout.bytes_per_block, num_blocks),
                    impl=impl)
    for layer, index, data in export.payloads:
        if index == num_blocks:
            import_payload(dst, seq, export.num_tokens, layer, index, data)
    assert export.total_bytes == export.layout.total_bytes(export.num_tokens)
    src.release_prefilled(request_id)
    dst.commit_migrated(request_id, export.first_token_id)


def assert_all_free(*engines: Engine) -> None:
    for e in engines:
        assert e.blocks.num_free_blocks == e.blocks.num_blocks
        assert len(e.blocks.free_seq_slots) == e.config.max_num_seqs
        assert not e.scheduler.held and not e.requests


@pytest.mark.parametrize("device, impl", [("cpu", "auto"), ("cpu", "triton"), pytest.param("cuda", "auto", marks=pytest.mark.gpu),
                                          pytest.param("cuda", "torch", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-moe"])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_pd_equals_colocated(kv_format, model, device, impl):
    """Each call imports runs of several layers at once, cut and reordered. The receiver's write: numpy on the
    CPU ('auto'), one Triton scatter launch ('triton' on the CPU through the interpreter, 'auto' on CUDA) or one
    indexed copy per layer and part on CUDA ('torch')."""
    colocated = make_engine(kv_format, model, device)
    expected = {}
    for i, p in enumerate(PROMPTS):  # one at a time, so each prompt is chunked as the prefill engine chunks it
        colocated.add_request(f"r{i}", p, GREEDY)
        expected.update(run_to_end(colocated))
    src, dst = make_engine(kv_format, model, device), make_engine(kv_format, model, device)
    got = {}
    for i, p in enumerate(PROMPTS):
        got[f"r{i}"] = [prefill(src, f"r{i}", p)]
        migrate(src, dst, f"r{i}", impl=impl)
    for rid, toks in run_to_end(dst).items():
        got[rid].extend(toks)
    assert got == expected
    assert_all_free(colocated, src, dst)


def test_kivi2_carries_the_residual():
    """A prompt that is not a multiple of R leaves rows in the residual; they travel as a state payload."""
    src = make_engine("kivi2")
    prefill(src, "r", PROMPTS[2])
    export = export_request(src, "r")
    layout = export.layout
    assert 45 % layout.state_period and layout.state_bytes(45) > 0
    n_blocks = layout.num_blocks(45)
    assert [i for _, i, _ in export.payloads].count(n_blocks) == layout.num_layers
    src.release_prefilled("r")
    assert_all_free(src)


def test_fallback_resumes_colocated_decode():
    colocated = make_engine()
    colocated.add_request("r", PROMPTS[1], GREEDY)
    expected = run_to_end(colocated)["r"]
    src = make_engine()
    first = prefill(src, "r", PROMPTS[1])
    src.resume_prefilled("r")
    assert [first] + run_to_end(src)["r"] == expected
    assert_all_free(src)


def test_reserve_capacity_and_abort():
    dst = make_engine(num_kv_blocks=8)  # 8 blocks of 16 tokens
    dst.reserve_migrated("a", [3] * 100, SamplingParams(max_tokens=4))
    with pytest.raises(KvCapacityError, match="needs 3 KV blocks for 40 tokens, 1 free"):
        dst.reserve_migrated("b", [3] * 40, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="already running"):
        dst.reserve_migrated("a", [3] * 4)
    assert dst.abort_reserved("a") and not dst.abort_reserved("a")
    assert_all_free(dst)
    with pytest.raises(InvalidRequestError, match="no reservation"):
        dst.commit_migrated("a", 5)


def test_seq_slots_bound_reservations():
    dst = make_engine()
    for i in range(4):
        dst.reserve_migrated(f"r{i}", [3] * 4, GREEDY)
    with pytest.raises(KvCapacityError, match="sequence slot"):
        dst.reserve_migrated("r4", [3] * 4, GREEDY)
    dst.add_request("w", [3] * 4, GREEDY)  # waits: every slot is held, so it is not admitted
    assert dst.step() == [] and dst.scheduler.waiting
    for i in range(4):
        dst.abort_reserved(f"r{i}")
    assert run_to_end(dst)["w"]
    assert_all_free(dst)


def test_first_token_that_finishes_is_refused():
    dst = make_engine()
    dst.reserve_migrated("r", [3] * 4, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="nothing left to decode"):
        dst.commit_migrated("r", 5)
    dst.abort_reserved("r")
    assert_all_free(dst)


def test_format_mismatch_is_refused():
    with pytest.raises(KvLayoutMismatch, match="format conversion is not supported"):
        kv_layout(make_engine("int8")).check_compatible(kv_layout(make_engine("int4")).to_proto())
    fp8_a, fp8_b = make_engine("fp8"), make_engine("fp8")
    fp8_b.runner.backend.caches[1].state["scales"][0, 0] = 2.0
    with pytest.raises(KvLayoutMismatch, match="scales_crc"):
        kv_layout(fp8_a).check_compatible(kv_layout(fp8_b).to_proto())


def test_abort_of_held_prefill_frees_blocks():
    src = make_engine()
    prefill(src, "r", PROMPTS[3])
    assert src.blocks.num_free_blocks < src.blocks.num_blocks
    assert src.abort("r")
    src.step()
    assert_all_free(src)


def test_on_held_observes_the_held_request_inside_its_step():
    """on_held's observer runs in the step that holds the request, before that step's outputs are returned, and
    an export begun there equals one begun afterwards; it is not called for a request whose first token ends it,
    nor after an abort, and only a queued prefill-only request takes one."""
    engine = make_engine("kivi2")
    delivered: set[str] = set()
    seen, exports = [], []

    def observe(seq):
        seen.append((seq.request_id, seq.request_id in delivered, engine.prefilled_sequence(seq.request_id) is seq))
        exports.append(begin_export(engine, seq.request_id))

    engine.add_request("held", PROMPTS[2], GREEDY, prefill_only=True)
    engine.add_request("ends", PROMPTS[1], SamplingParams(max_tokens=1, temperature=0.0), prefill_only=True)
    engine.add_request("gone", PROMPTS[0], GREEDY, prefill_only=True)
    engine.add_request("plain", PROMPTS[0], GREEDY)
    for request_id in ("held", "ends", "gone"):
        engine.on_held(request_id, observe)
    with pytest.raises(InvalidRequestError):
        engine.on_held("plain", observe)
    engine.abort("gone")
    while engine.has_unfinished():
        delivered.update(out.request_id for out in engine.step())
    assert seen == [("held", False, True)]
    with pytest.raises(InvalidRequestError):
        engine.on_held("held", observe)  # held already
    early, later = exports[0].result(timeout=60), begin_export(engine, "held").result(timeout=60)
    assert [(layer, i, bytes(d)) for layer, i, d in early.payloads] == [
        (layer, i, bytes(d)) for layer, i, d in later.payloads]
    engine.release_prefilled("held")
    assert_all_free(engine)


def test_on_scheduled_observes_a_prefill_once_as_its_first_step_begins():
    """on_scheduled's observer runs in the step that first schedules the request's prefill, before that step
    computes anything, and once even when the prefill takes several chunked steps; not for a request still
    queued behind others, nor after an abort; only a queued prefill-only request takes one."""
    engine = make_engine(max_num_batched_tokens=32, max_num_seqs=2)
    seen: list[tuple[str, int, int]] = []  # (request, step, tokens computed when observed)
    step = 0

    def observe(seq):
        seen.append((seq.request_id, step, seq.num_computed_tokens))

    engine.add_request("long", PROMPTS[3], GREEDY, prefill_only=True)  # 70 tokens: three steps of 32
    engine.add_request("gone", PROMPTS[1], GREEDY, prefill_only=True)
    engine.add_request("next", PROMPTS[2], GREEDY, prefill_only=True)
    engine.add_request("plain", PROMPTS[0], GREEDY)
    for request_id in ("long", "gone", "next"):
        engine.on_scheduled(request_id, observe)
    with pytest.raises(InvalidRequestError):
        engine.on_scheduled("plain", observe)
    engine.abort("gone")
    computed_at: dict[str, int] = {}
    while engine.has_unfinished() and step < 50:
        engine.step()
        for request_id in ("long", "next"):
            req = engine.requests.get(request_id)
            if req is not None and req.seq.num_computed_tokens and request_id not in computed_at:
                computed_at[request_id] = step
        step += 1
        for request_id in ("long", "next"):
            if request_id in engine.requests and engine.requests[request_id].seq.status is Status.HELD:
                engine.release_prefilled(request_id)
    assert sorted(seen) == sorted([("long", computed_at["long"], 0), ("next", computed_at["next"], 0)])
    assert computed_at["next"] > 0  # it waited behind the long prompt's first chunk
    assert_all_free(engine)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_format", ["none", "int4", "kivi2"])
def test_streamed_layers_equal_the_export(device, kv_format):
    """The payloads handed out layer by layer during the prefill (on CUDA copied to the host on a side stream
    and delivered from a copy thread) are the bytes export_request reads after it, kivi2's residual included."""
    engine = make_engine(kv_format, device=device, max_num_batched_tokens=128)
    num_layers = engine.model_config.num_layers
    got: dict[tuple[int, int], bytes] = {}
    order: list[int] = []
    done = threading.Event()

    def sink(payloads):
        order.append(payloads[0][0])
        got.update(((layer, i), data) for layer, i, data in payloads)
        if len(order) == num_layers:
            done.set()

    engine.add_request("r", PROMPTS[3], GREEDY, prefill_only=True)
    stream_layers(engine, "r", sink)
    run_to_end(engine)
    assert done.wait(60), f"{len(order)} of {num_layers} layers delivered"
    assert order == list(range(num_layers))
    export = export_request(engine, "r")
    assert got == {(layer, i): data for layer, i, data in export.payloads}
    engine.release_prefilled("r")
    assert_all_free(engine)


@pytest.mark.parametrize("device, staging_bytes", [("cpu", None), pytest.param("cuda", None, marks=pytest.mark.gpu),
                                                   pytest.param("cuda", 4096, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_format", ["none", "int4", "kivi2"])
def test_begun_export_equals_copies_made_on_the_engine_thread(device, staging_bytes, kv_format, monkeypatch):
    """begin_export's payloads (on CUDA gathered and copied to the host on a side stream, through a staging
    buffer that holds the whole export or a few blocks at a time, and completed from a copy thread, while the
    engine decodes another request) are the bytes of synchronous copies of each layer, kivi2's residual
    included."""
    if staging_bytes is not None:
        monkeypatch.setattr(kv_migration, "EXPORT_STAGING_BYTES", staging_bytes)
    engine = make_engine(kv_format, device=device, max_num_batched_tokens=128)
    first = prefill(engine, "r", PROMPTS[3])
    pending = begin_export(engine, "r")
    engine.add_request("other", PROMPTS[2], GREEDY)
    assert len(run_to_end(engine)["other"]) == GREEDY.max_tokens
    export = pending.result(timeout=60)
    seq = engine.prefilled_sequence("r")
    rows = request_rows(engine, seq, len(PROMPTS[3]))
    expected = [p for layer in range(engine.model_config.num_layers) for p in export_layer(engine, rows, layer)]
    assert [(layer, i, bytes(d)) for layer, i, d in export.payloads] == [
        (layer, i, bytes(d)) for layer, i, d in expected]
    assert (export.prompt_token_ids, export.first_token_id) == (PROMPTS[3], first)
    engine.release_prefilled("r")
    assert_all_free(engine)


@pytest.mark.gpu
def test_exports_in_pieces_compile_nothing_after_prepare_exports(monkeypatch):
    """Pieces start on any table entry (their tables are slices at any 24-byte offset): after prepare_exports
    no export launches a kernel that Triton has not compiled yet (its compile hook sees none)."""
    import triton
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook")
    monkeypatch.setattr(kv_migration, "EXPORT_STAGING_BYTES", 3000)
    engine = make_engine("int4", device="cuda", max_num_batched_tokens=128)
    target = cache_target(engine)
    kv_migration.prepare_exports(target)
    compiled = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: compiled.append(kw["fn"].name))
    for name, prompt in (("a", PROMPTS[3]), ("b", PROMPTS[2])):
        prefill(engine, name, prompt)
        export = begin_export(engine, name, target).result(timeout=60)
        assert export.total_bytes == export.layout.total_bytes(len(prompt))
        engine.release_prefilled(name)
    assert compiled == []
    assert_all_free(engine)


@pytest.mark.gpu
def test_failed_copy_fails_the_begun_export(monkeypatch):
    engine = make_engine("int4", device="cuda", max_num_batched_tokens=128)
    prefill(engine, "r", PROMPTS[3])

    def broken(host):
        raise RuntimeError("host copy lost")

    monkeypatch.setattr(kv_migration, "_bytes_view", broken)
    with pytest.raises(RuntimeError, match="host copy lost"):
        begin_export(engine, "r").result(timeout=60)
    engine.release_prefilled("r")
    assert_all_free(engine)


@pytest.mark.parametrize("gather", ["kernel", "kernel in pieces", "kernel per entry", "reference"])
@pytest.mark.parametrize("prompt_len", [70, 64])  # kivi2: 6 residual rows, none
@pytest.mark.parametrize("kv_format", FORMATS)
def test_planned_gather_equals_the_layers_copies(kv_format, prompt_len, gather):
    """The CUDA export's gather (`export_plan`, run here by the kernel under the interpreter, through a staging
    buffer that holds the whole export, a few entries or one entry, or by the memmove reference) lays out every
    payload byte for byte as the per-layer copies do, state rows included, for a request whose blocks do not
    start at the cache's first block."""
    engine = make_engine(kv_format, max_num_batched_tokens=128)
    prefill(engine, "before", PROMPTS[2])
    prompt = [(3 * j) % 500 + 2 for j in range(prompt_len)]
    prefill(engine, "r", prompt)
    seq = engine.prefilled_sequence("r")
    rows = request_rows(engine, seq, prompt_len)
    target = cache_target(engine)
    plan = export_plan(target, seq.block_table[:rows.layout.num_blocks(prompt_len)], prompt_len, seq.kv_slot)
    if gather.startswith("kernel"):
        entry_bytes = int(plan.table[:, 2].max()) * plan.word.itemsize
        staging = {"kernel": EXPORT_STAGING_BYTES, "kernel in pieces": 3 * entry_bytes + 8,
                   "kernel per entry": 1}[gather]
        _, pieces = export_pieces(plan, staging)
        firsts, ends, starts, sizes = (list(column) for column in zip(*pieces))
        assert firsts == [0, *ends[:-1]] and ends[-1] == len(plan.table)  # runs of entries, each entry once
        assert starts == [0, *np.cumsum(sizes)[:-1]] and sum(sizes) == plan.total_bytes  # tiling the buffer
        assert all(size <= staging or end == first + 1 for first, end, _, size in pieces)
        if gather == "kernel":
            assert len(pieces) == 1
        elif gather == "kernel per entry":
            assert len(pieces) == len(plan.table)
        else:
            assert 1 < len(pieces) < len(plan.table)
        buffer = torch.zeros(plan.total_bytes, dtype=torch.uint8)
        gather_in_pieces(plan, engine.device, buffer, staging)
    else:
        buffer = torch.zeros(plan.total_bytes, dtype=torch.uint8)
        gather_copy_reference(buffer.view(plan.word), torch.from_numpy(plan.table))
    expected = [p for layer in range(engine.model_config.num_layers) for p in export_layer(engine, rows, layer)]
    assert [(layer, i, bytes(buffer[a:b].numpy())) for layer, i, a, b in plan.spans] == [
        (layer, i, bytes(d)) for layer, i, d in expected]
    assert plan.total_bytes == rows.layout.total_bytes(prompt_len)
    has_state = kv_format == "kivi2" and prompt_len % rows.layout.state_period != 0
    assert len(plan.spans) == engine.model_config.num_layers * (2 if has_state else 1)
    for name in ("before", "r"):
        engine.release_prefilled(name)
    assert_all_free(engine)


def test_export_plan_refuses_a_table_that_does_not_fit_the_layout():
    engine = make_engine("int4", max_num_batched_tokens=128)
    prefill(engine, "r", PROMPTS[3])
    seq = engine.prefilled_sequence("r")
    with pytest.raises(ValueError, match="do not match the layout"):
        export_plan(cache_target(engine), seq.block_table[:2], len(PROMPTS[3]), seq.kv_slot)
    engine.release_prefilled("r")

import math

import pytest
import torch

from partita.workers.engine.sampler import SampleRequest, sample
from partita.workers.errors import InvalidRequestError
from partita.workers.sampling_params import SamplingParams


def rows(n, **kw):
    return [SampleRequest(SamplingParams(**kw), None, []) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert [r.token_id for r in sample(logits, rows(5, temperature=0.0))] == logits.argmax(-1).tolist()
    assert [r.token_id for r in sample(logits, rows(5, top_k=1))] == logits.argmax(-1).tolist()


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(4000, 1)
    tokens = torch.tensor([r.token_id for r in sample(logits, rows(4000, temperature=1.0))])
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    expected = torch.softmax(logits[0], -1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_k_top_p_min_p_only_sample_allowed_tokens():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()[None].repeat(2000, 1)
    for kw, allowed in [(dict(top_k=2), {0, 1}), (dict(top_p=0.85), {0, 1, 2}), (dict(top_p=0.5), {0}),
                        (dict(min_p=0.15), {0, 1, 2})]:
        got = {r.token_id for r in sample(logits, rows(2000, **kw))}
        assert got == allowed, (kw, got)


def test_seeded_rows_do_not_depend_on_their_batch():
    logits = torch.randn(3, 100)

    def draw(batch_logits, index):
        rs = rows(batch_logits.shape[0], temperature=1.0)
        rs[index] = SampleRequest(SamplingParams(temperature=1.0, seed=42), torch.Generator().manual_seed(42), [])
        return sample(batch_logits, rs, torch.Generator().manual_seed(index))[index].token_id

    alone = [draw(logits[1:2], 0) for _ in range(3)]
    in_batch = [draw(logits, 1) for _ in range(3)]
    assert alone == in_batch


def test_logprobs_are_the_model_log_softmax():
    logits = torch.randn(2, 30)
    res = sample(logits, rows(2, temperature=0.0, logprobs=3))
    ref = torch.log_softmax(logits, -1)
    for i, r in enumerate(res):
        assert math.isclose(r.logprob, ref[i, r.token_id].item(), rel_tol=1e-5)
        assert list(r.top_logprobs) == torch.topk(ref[i], 3).indices.tolist()


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    req = [SampleRequest(SamplingParams(temperature=0.0, repetition_penalty=2.0), None, [0])]
    assert sample(logits, req)[0].token_id == 1


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("seed", -1), ("logprobs", 21),
    ("repetition_penalty", 0.0), ("stop", ["ok", ""]), ("stop_token_ids", [-1])])
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.field.startswith(field)

"""The decode engine: sequences that join and leave a running batch get exactly the
text they would get alone, for every architecture."""

import dataclasses

import pytest
import torch

from models_src import ARCHITECTURES, ModelConfig, build_model
from models_src.base import LanguageModel
from models_src.generation import DRAW_CHUNK, Batch, Sequence
from models_src.layers import KVCache
from models_src.sampling import SamplingParams, uniforms

V, SEP, BOS, EOS = 60, 3, 1, 2


class IdTokenizer:
    """Token i is the character chr(0x4e00 + i): every id decodes to its own text."""
    bos_id, eos_id, pad_id = BOS, EOS, 0

    def encode(self, text):
        return [ord(c) - 0x4E00 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x4E00 + i) for i in ids if not (skip_special_tokens and i in (0, BOS, EOS)))


TOK = IdTokenizer()


def make(arch, block_size=64):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_hidden=48,
                      block_size=block_size, sep_id=SEP)
    return build_model(cfg).eval()


def prompt(n, seed, arch):
    g = torch.Generator().manual_seed(seed)
    ids = [BOS, *torch.randint(4, V, (n,), generator=g).tolist()]
    if arch == "seq2seq":
        ids[len(ids) // 2] = SEP  # a source, then the target side from the separator on
    return ids


def alone(model, ids, params):
    """The completion of a request running on its own in a batch."""
    batch = Batch(model, TOK)
    seq, = batch.add([(ids, params)])
    while batch:
        batch.step()
    return seq.completion


def run(batch, arrivals):
    """Step the batch; arrivals maps a step number to requests joining before it."""
    texts, step, seqs = {}, 0, []
    while batch or any(k >= step for k in arrivals):
        seqs += batch.add(arrivals.get(step, []))
        for seq, piece in batch.step():
            texts[seq] = texts.get(seq, "") + piece
        step += 1
    return seqs, texts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sequences_joining_at_different_steps_match_running_alone(arch):
    model = make(arch)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    penalised = SamplingParams(max_new_tokens=7, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)
    requests = {0: [(prompt(5, 1, arch), greedy), (prompt(11, 2, arch), sampled)],
                3: [(prompt(8, 3, arch), penalised)],
                4: [(prompt(3, 4, arch), greedy)]}
    seqs, texts = run(Batch(model, TOK), requests)
    expected = [alone(model, ids, params) for step in sorted(requests) for ids, params in requests[step]]
    for seq, want in zip(seqs, expected):
        assert seq.completion.token_ids == want.token_ids
        assert seq.completion.text == want.text == texts[seq]
        assert seq.completion.finish_reason == "length"
        assert seq.completion.prompt_tokens == want.prompt_tokens
        assert seq.completion.completion_tokens == want.completion_tokens


def test_a_row_draws_its_uniforms_in_chunks_as_one_at_a_time():
    """Rows fetch DRAW_CHUNK draws at once: a CPU generator's stream does not depend on how
    many are drawn at a time, so a seed gives the same draws past a chunk."""
    params = SamplingParams(temperature=1.0, seed=11)
    seq = Sequence([BOS], params, TOK, V, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    assert [seq.uniform() for _ in range(DRAW_CHUNK * 2 + 22)] == \
        [uniforms(1, g, "cpu").item() for _ in range(DRAW_CHUNK * 2 + 22)]


class Rows:
    """FixedLM's state: just a number of rows."""

    def __init__(self, n):
        self.n = n

    def select(self, rows):
        return Rows(len(rows))

    def append(self, other):
        return Rows(self.n + other.n)


class FixedLM(LanguageModel):
    """The same logits at every step, whatever the input."""
    max_context = None

    def __init__(self, logits):
        super().__init__(ModelConfig(arch="gpt", vocab_size=len(logits), n_layer=1, n_embd=4,
                                     n_head=1, block_size=8))
        self.logits = torch.tensor(logits)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def init_state(self, batch_size):
        return Rows(batch_size)

    def step(self, tokens, state, lengths=None):
        return self.logits.expand(tokens.size(0), tokens.size(1), -1), state


def draws(logits, params, n=400):
    """The first token of ``n`` sequences (eos counts as a token like any other)."""
    params = dataclasses.replace(params, ignore_eos=True)
    batch = Batch(FixedLM(logits), TOK)
    seqs = batch.add([([BOS], params)] * n)
    batch.step()
    return torch.tensor([s.stream.ids[0] for s in seqs])


def test_batched_sampling_follows_each_rows_processors():
    logits = [3.0, 2.5, 2.0, 1.0, 0.5, -1.0] + [-9.0] * 54
    assert set(draws(logits, SamplingParams(top_k=1, seed=1)).tolist()) == {0}
    assert set(draws(logits, SamplingParams(top_p=1e-6, seed=1)).tolist()) == {0}
    assert set(draws(logits, SamplingParams(top_k=3)).tolist()) == {0, 1, 2}
    nucleus = torch.tensor(logits).softmax(-1)  # the smallest set reaching 0.9: tokens 0-3
    assert set(draws(logits, SamplingParams(top_p=0.9)).tolist()) == {0, 1, 2, 3}
    assert nucleus[:3].sum() < 0.9 <= nucleus[:4].sum()
    # (rows of one seed all draw the same: these use fresh entropy)
    # plain sampling follows the softmax: token 0 about 41 % of 2,000 draws
    counts = torch.bincount(draws(logits, SamplingParams(), n=2000), minlength=60).float()
    expected = 2000 * torch.tensor(logits).softmax(-1)
    assert torch.all((counts[:6] - expected[:6]).abs() < 4 * expected[:6].sqrt() + 3)
    # a high temperature flattens, a repetition penalty pushes a seen token down
    hot = draws(logits, SamplingParams(temperature=50.0), n=1000)
    assert (hot >= 6).float().mean() > 0.5
    penalised = draws(logits, SamplingParams(temperature=0.0, repetition_penalty=10.0), n=1)
    assert draws(logits, SamplingParams(temperature=0.0), n=1).tolist() == [0]
    assert penalised.tolist() == [0]  # bos (id 1) was seen, not token 0: unchanged


def test_mixed_settings_in_one_batch_are_each_respected():
    logits = [3.0, 2.5, 2.0, 1.0, 0.5, -1.0] + [-9.0] * 54
    batch = Batch(FixedLM(logits), TOK)
    greedy, top1, hot = batch.add([([BOS], SamplingParams(temperature=0.0)),
                                   ([BOS], SamplingParams(top_k=1, seed=0)),
                                   ([BOS], SamplingParams(temperature=50.0, seed=0))])
    for _ in range(30):
        batch.step()
    assert set(greedy.stream.ids) == set(top1.stream.ids) == {0}
    assert len(set(hot.stream.ids)) > 5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_full_context_is_reprimed_and_each_row_matches_running_alone(arch):
    model = make(arch, block_size=16)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    requests = {0: [(prompt(10, 1, arch), params)], 2: [(prompt(4, 2, arch), params)]}
    seqs, _ = run(Batch(model, TOK), requests)
    for seq, (ids, p) in zip(seqs, [r for k in sorted(requests) for r in requests[k]]):
        assert seq.completion.token_ids == alone(model, ids, p).token_ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_prompt_longer_than_the_context_keeps_its_end(arch):
    model = make(arch, block_size=16)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    ids = prompt(30 if arch != "seq2seq" else 12, 3, arch)  # seq2seq: the target side overflows
    if arch == "seq2seq":
        ids += list(range(10, 30))
    kept = ids if model.max_context is None else model.context_ids(ids, model.max_context)
    want = alone(model, kept, params)
    assert alone(model, ids, params).token_ids == want.token_ids
    assert alone(model, ids, params).prompt_tokens == len(ids)


def test_a_reprimed_encoder_decoder_still_reads_its_source():
    """Past the context the decoder restarts from the last half of its target side; the
    source stays (cutting the whole row from the left used to drop it)."""
    model = make("seq2seq", block_size=16)
    source = [BOS, *range(10, 22)]  # 13 ids, then the separator
    ids = [*source, SEP, 30, 31]
    fed = []
    step = model.step

    def recording_step(tokens, state, lengths=None):
        if state.memory_kv is None:  # a fresh state: a prefill or a re-prime
            fed.append(tokens[0].tolist())
        return step(tokens, state, lengths)

    model.step = recording_step
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    done = alone(model, ids, params)
    assert len(done.token_ids) == 40 and len(fed) >= 3  # re-primed at least twice
    for row in fed:
        assert row[:len(source) + 1] == [*source, SEP]
        assert len(row) - len(source) <= 16  # the target side fits the context
    assert fed[1][len(source) + 1:] == (ids[len(source) + 1:] + done.token_ids)[-7:]  # 16 // 2 - 1


def test_stop_strings_and_eos_end_rows_independently():
    model = make("gpt")
    free = alone(model, prompt(6, 1, "gpt"), SamplingParams(max_new_tokens=20, temperature=0.0,
                                                           ignore_eos=True))
    stop = free.text[5:7]
    batch = Batch(model, TOK)
    short, long = batch.add([
        (prompt(6, 1, "gpt"), SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop])),
        (prompt(6, 2, "gpt"), SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))])
    while batch:
        batch.step()
        if short.completion is not None:
            assert len(batch) <= 1  # the finished row left at once
    assert short.completion.finish_reason == "stop"
    assert short.completion.text == free.text[:free.text.index(stop)]
    assert long.completion.finish_reason == "length" and len(long.completion.token_ids) == 20


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_removed_sequences_leave_and_the_rest_go_on(arch):
    model = make(arch)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [prompt(5 + i, i, arch) for i in range(4)]
    batch = Batch(model, TOK)
    seqs = batch.add([(ids, params) for ids in prompts])
    batch.step()
    batch.remove(seqs[1])  # a middle row: the last one takes its place
    assert len(batch) == 3
    while batch:
        batch.step()
    assert seqs[1].completion is None
    for i in (0, 2, 3):
        assert seqs[i].completion.token_ids == alone(model, prompts[i], params).token_ids


def test_the_key_value_cache_regroups_in_place_copying_only_moved_rows():
    def cache(rows, lengths):
        c = KVCache(2, rows, 2, 8, 4, device="cpu", dtype=torch.float32)
        c.begin(8, None)  # room for all 8 positions
        c.k.normal_(), c.v.normal_()
        c.lengths = torch.tensor(lengths)
        return c

    a, b = cache(4, [3, 5, 2, 5]), cache(2, [1, 1])
    want_k = torch.cat([a.k[:, [0, 3, 2]], b.k], 1)
    want_v = torch.cat([a.v[:, [0, 3, 2]], b.v], 1)
    storage = a._k_rows.data_ptr()
    kept = a.select(torch.tensor([0, 3, 2]))  # row 1 leaves, row 3 moves into its place
    joined = kept.append(b)  # 3 + 2 rows > 4: the storage doubles
    assert joined.lengths.tolist() == [3, 5, 2, 1, 1] and joined.uniform is None
    assert torch.equal(joined.k, want_k) and torch.equal(joined.v, want_v)
    assert kept is a and joined is a and joined.capacity == 8 and a._k_rows.data_ptr() != storage
    storage = joined._k_rows.data_ptr()
    again = joined.select(torch.tensor([3, 4])).append(cache(3, [2, 2, 2]))
    assert again.capacity == 8 and again._k_rows.data_ptr() == storage  # room enough: no new storage
    assert again.lengths.tolist() == [1, 1, 2, 2, 2] and torch.equal(again.k[:, :2], want_k[:, 3:])
    # rows that are read and written in the same regrouping (here two swap places)
    want_k = again.k[:, [1, 0, 4, 3]].clone()
    swapped = again.select(torch.tensor([1, 0, 4, 3]))
    assert swapped.lengths.tolist() == [1, 1, 2, 2] and torch.equal(swapped.k, want_k)


def test_the_key_value_cache_allocates_positions_as_they_fill():
    """A fresh cache holds no positions; a step reserves what it needs (doubling, up to the
    context), and a joining cache copies only the positions it holds."""
    def cache(rows, T):
        c = KVCache(2, rows, 2, 16, 4, device="cpu", dtype=torch.float32)
        assert c.positions == 0
        c.begin(T, None)
        c.k.normal_(), c.v.normal_()
        c.end()
        return c

    running, prompt = cache(2, 5), cache(1, 3)
    assert (running.positions, prompt.positions) == (5, 3)
    running.begin(1, None)  # a sixth token: the room doubles
    assert running.positions == 10
    before = running.k.clone()
    joined = running.append(prompt)
    assert joined.positions == 10 and joined.lengths.tolist() == [5, 5, 3]
    assert torch.equal(joined.k[:, :2], before) and torch.equal(joined.k[:, 2:, :, :3], prompt.k)
    with pytest.raises(ValueError, match="exceeds the context"):
        cache(1, 17)


def test_zero_new_tokens_completes_without_joining_and_bad_prompts_are_refused():
    batch = Batch(make("gpt"), TOK)
    seq, = batch.add([([BOS, 5], SamplingParams(max_new_tokens=0))])
    assert len(batch) == 0 and seq.completion.finish_reason == "length" and seq.completion.text == ""
    with pytest.raises(ValueError, match="at least one token"):
        batch.add([([], SamplingParams())])
    # a prompt joins in the step the running rows share: a bad id is refused at add, and
    # the batch goes on as if it had never been offered
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    running, = batch.add([(prompt(5, 1, "gpt"), params)])
    batch.step()
    for bad in ([BOS, V], [BOS, -1]):
        with pytest.raises(ValueError, match=r"ids must be in \[0, 60\)"):
            batch.add([(bad, params)])
    assert len(batch) == 1
    while batch:
        batch.step()
    assert running.completion.token_ids == alone(make("gpt"), prompt(5, 1, "gpt"), params).token_ids


def test_a_removed_sequence_that_has_not_joined_yet_never_runs():
    model = make("gpt")
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    batch = Batch(model, TOK)
    kept, dropped = batch.add([(prompt(5, 1, "gpt"), params), (prompt(7, 2, "gpt"), params)])
    assert batch.sequences == [kept, dropped]  # both wait for the next step
    batch.remove(dropped)
    assert batch.sequences == [kept]
    while batch:
        assert [s for s, _ in batch.step()] == [kept]
    assert dropped.completion is None and dropped.generated == 0


# ---- log-probabilities ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_log_probabilities_are_the_model_s_own_and_change_nothing_else(arch):
    model = make(arch)
    ids = prompt(6, 1, arch)
    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_k=10, seed=3)
    plain = alone(model, ids, params)
    scored = alone(model, ids, dataclasses.replace(params, logprobs=3))
    assert scored.text == plain.text and plain.logprobs is None
    assert [e.token_id for e in scored.logprobs] == scored.token_ids
    context = list(ids)
    for entry in scored.logprobs:  # each figure is log_softmax of the model's logits then
        with torch.no_grad():
            logits = model(torch.tensor([context]))[0][0, -1]
        expected = torch.log_softmax(logits.float(), -1)
        assert entry.logprob == pytest.approx(expected[entry.token_id].item(), abs=1e-4)
        best = expected.topk(3)
        assert [i for i, _ in entry.top] == best.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        context.append(entry.token_id)


def test_only_the_rows_that_ask_get_log_probabilities():
    model = make("gpt")
    batch = Batch(model, TOK)
    asks, quiet, more = batch.add([(prompt(4, 1, "gpt"), SamplingParams(max_new_tokens=4, seed=1, logprobs=0)),
                                   (prompt(5, 2, "gpt"), SamplingParams(max_new_tokens=4, seed=2)),
                                   (prompt(3, 3, "gpt"), SamplingParams(max_new_tokens=4, seed=3, logprobs=2))])
    while batch:
        batch.step()
    assert quiet.completion.logprobs is None
    assert [len(e.top) for e in asks.completion.logprobs] == [0] * 4
    assert [len(e.top) for e in more.completion.logprobs] == [2] * 4


def test_logprobs_are_bounded():
    with pytest.raises(ValueError, match="logprobs must be an integer in"):
        SamplingParams(logprobs=21)

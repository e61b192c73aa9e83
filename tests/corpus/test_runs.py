"""Corpus runs: batched equals one by one, failures are listed, and the run is exactly-once and
resumable — an interrupted run resumed, three shards plus reduce, and a chunk committed twice all
equal one uninterrupted run bit for bit; another fingerprint is refused; orphans are swept."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers.corpus_fixtures import corpus_model, write_conllu

import tl_normmix as nm
from tl_normmix.corpus.chunk import ChunkAnalyser
from tl_normmix.corpus.plan import make_plan
from tl_normmix.corpus.store import Store

SCOPES = ("attn_w", "attn_n", "attnres_n")
OPTIONS = dict(chunk_size=7, batch_size=4, progress=False)


def cfg(**changes) -> nm.corpus.CorpusConfig:
    """The tests' run configuration with ``changes``."""
    return nm.corpus.CorpusConfig(**{**OPTIONS, **changes})


@pytest.fixture(params=["gpt2", "bert"])
def family(request):
    return request.param


@pytest.fixture
def corpus(tmp_path):
    return write_conllu(tmp_path / "fixture.conllu", n=30)


def _equal(a: nm.corpus.CorpusResult, b: nm.corpus.CorpusResult) -> None:
    pd.testing.assert_frame_equal(a.agg, b.agg, check_exact=True)
    pd.testing.assert_frame_equal(a.top, b.top, check_exact=True)
    pd.testing.assert_frame_equal(a.sentences, b.sentences, check_exact=True)


def test_batched_equals_one_by_one(family, hf_root, corpus, tmp_path):
    """Padding never enters a statistic: batch size 4 (padded) equals batch size 1."""
    model = corpus_model(family, hf_root)
    batched = nm.corpus.analyse(model, corpus, tmp_path / "b", SCOPES, config=cfg())
    single = nm.corpus.analyse(model, corpus, tmp_path / "s", SCOPES, cfg(batch_size=1))
    assert batched.summary().set_index("status").sentences["analysed"] == 30
    a, b = batched.agg, single.agg
    torch.testing.assert_close(
        torch.tensor(a["sum"].to_numpy()), torch.tensor(b["sum"].to_numpy()), rtol=1e-5, atol=1e-6
    )
    assert (a["count"] == b["count"]).all()
    accuracy = batched.relation_accuracy("attn_n")
    assert set(accuracy.direction) == {"dep->head", "head->dep"}
    assert accuracy.accuracy.between(0, 1).all()
    best = batched.best_heads("attn_w")
    assert best.relation.iloc[0] == "all" and (best["head"] >= 0).all()
    assert (batched.best_heads("attnres_n")["head"] == -1).all()  # a layer scope
    shares = batched.pos_share("attn_w").groupby(["layer", "head"]).share.sum()
    assert shares.between(0, 1 + 1e-9).all()


def test_the_chunk_matches_the_maps_of_each_sentence(hf_root, corpus):
    """The chunk's sums are those of ``sentence_sums`` over maps computed sentence by sentence."""
    from tl_normmix.corpus.conllu import read_conllu
    from tl_normmix.corpus.statistics import sentence_sums

    model = corpus_model("gpt2", hf_root)
    analyser = ChunkAnalyser(model, ("attn_w",), batch_size=3)
    sentences = list(enumerate(read_conllu(corpus)[:5]))
    tables = analyser.run(sentences)
    expected = 0.0
    for _, sentence in sentences:
        aligned, _, _ = analyser.prepare(sentence)
        toks = torch.tensor([aligned.tokens])
        _, cache = model.run_with_cache(toks, names_filter=nm.hook_filter(model, "attn_w"))
        maps = nm.mixing_maps(model, cache, "attn_w")
        stack = torch.cat([maps.heads["attn_w"][0, 0], maps["attn_w"][0, 0][None]])
        expected += float(sentence_sums(stack, analyser.labels(aligned)).distance.sum())
    got = tables.agg[(tables.agg.stat == "distance") & (tables.agg.layer == 0)]["sum"].sum()
    assert abs(got - expected) < 1e-4 * (1 + abs(expected))


def test_failures_are_counted_and_listed(hf_root, tmp_path):
    model = corpus_model("gpt2", hf_root)
    path = write_conllu(tmp_path / "f.conllu", n=6)
    text = path.read_text()
    long_words = " ".join(f"t{10 + i % 80}" for i in range(80))
    rows = "\n".join(
        f"{i + 1}\tt{10 + i % 80}\t_\tNOUN\t_\t_\t{min(i, 1)}\t{'dep' if i else 'root'}\t_\t_"
        for i in range(80)
    )
    text += f"# text = {long_words}\n{rows}\n\n"
    text = text.replace("# text = t", "# text = x", 1)  # sentence 0: text does not match
    path.write_text(text)
    res = nm.corpus.analyse(model, path, tmp_path / "o", ("attn_w",), config=cfg())
    counts = res.summary().set_index("status").sentences
    assert counts.to_dict() == {"alignment_failed": 1, "analysed": 5, "too_long": 1}
    failures = res.failures()
    assert list(failures.status) == ["alignment_failed", "too_long"]
    assert failures.line.iloc[0] == 1 and "is not where the # text line" in failures.reason.iloc[0]
    cut = nm.corpus.analyse(model, path, tmp_path / "t", ("attn_w",), config=cfg(truncate=True))
    assert cut.summary().set_index("status").sentences["truncated"] == 1


def test_an_interrupted_run_resumes_to_the_same_result(
    family, hf_root, corpus, tmp_path, monkeypatch
):
    model = corpus_model(family, hf_root)
    whole = nm.corpus.analyse(model, corpus, tmp_path / "whole", SCOPES, config=cfg())
    out = tmp_path / "cut"
    commit = Store.commit
    calls = []

    def interrupted(self, chunk, tables):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(chunk)
        commit(self, chunk, tables)

    monkeypatch.setattr(Store, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nm.corpus.analyse(model, corpus, out, SCOPES, config=cfg())
    monkeypatch.setattr(Store, "commit", commit)
    assert nm.corpus.status(out)["chunks_done"] == 2
    orphan, live, foreign = _temporary_files(out / "parts" / "agg")
    assert nm.corpus.status(out)["orphans"] == 2  # the dead writer's and the stale foreign one
    resumed = nm.corpus.analyse(model, corpus, out, SCOPES, config=cfg())
    assert nm.corpus.status(out)["orphans"] == 0
    assert not orphan.exists() and not foreign.exists() and live.exists()  # a live writer's stays
    _equal(whole, resumed)


def _temporary_files(folder):
    """A temporary file of a dead process of this host, one of this (live) process, and one of
    another host untouched for two hours."""
    import os
    import socket
    import subprocess
    import time

    host = socket.gethostname().replace("-", "_")
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = folder / f".tmp-{host}-{gone.pid}-x"
    live = folder / f".tmp-{host}-{os.getpid()}-y"
    foreign = folder / ".tmp-elsewhere-12345-z"
    for path in (orphan, live, foreign):
        path.write_bytes(b"half a file")
    old = time.time() - 7200
    os.utime(foreign, (old, old))
    return orphan, live, foreign


def test_shards_and_a_twice_committed_chunk_equal_one_run(hf_root, corpus, tmp_path):
    model = corpus_model("gpt2", hf_root)
    whole = nm.corpus.analyse(model, corpus, tmp_path / "whole", SCOPES, config=cfg())
    out = tmp_path / "sharded"
    for k in range(3):
        result = nm.corpus.analyse(model, corpus, out, SCOPES, config=cfg(shard=f"{k}/3"))
        assert (result is None) == (k < 2)  # the last shard finds every chunk done and reduces
    _equal(whole, nm.corpus.reduce(out))
    store = Store(out)
    again = ChunkAnalyser(model, SCOPES, batch_size=4).run(make_plan([corpus], 7).chunk(1))
    assert not store.commit(1, again)  # done already: not committed twice
    assert sorted(chunk for chunk, _, _ in store.commits()) == list(range(len(store.done())))
    _equal(whole, nm.corpus.reduce(out))
    _equal(whole, nm.corpus.reduce(out))  # idempotent


def test_another_fingerprint_is_refused(hf_root, corpus, tmp_path):
    model = corpus_model("gpt2", hf_root)
    out = tmp_path / "o"
    nm.corpus.analyse(model, corpus, out, ("attn_w",), config=cfg(max_sentences=7))
    with pytest.raises(ValueError, match="differs in: scopes"):
        nm.corpus.analyse(model, corpus, out, ("attn_n",), config=cfg(max_sentences=7))
    with pytest.raises(ValueError, match="batch_size"):
        nm.corpus.analyse(model, corpus, out, ("attn_w",), cfg(max_sentences=7, batch_size=2))
    redone = nm.corpus.analyse(model, corpus, out, ("attn_n",), cfg(max_sentences=7, restart=True))
    assert redone.scopes == ["attn_n"]
    with pytest.raises(ValueError, match="K/N"):
        cfg(shard="1of3")
    with pytest.raises(ValueError, match="model name or path"):
        nm.corpus.analyse(model, corpus, out, ("attn_n",), config=cfg(engine="ray"))


def test_the_weights_hash_follows_the_blocks(hf_root):
    from tl_normmix.corpus.plan import weights_hash

    model = corpus_model("gpt2", hf_root)
    before = weights_hash(model)
    assert weights_hash(model) == before
    with torch.no_grad():
        parameter = next(model.blocks[1].parameters())
        saved = parameter.clone()
        parameter.add_(1.0)
        try:
            assert weights_hash(model) != before
        finally:
            parameter.copy_(saved)
    assert weights_hash(model) == before

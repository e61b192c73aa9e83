"""Shards of one run started at the same moment, as a SLURM array starts them, never delete or
overwrite each other's files: every chunk is committed exactly once (the commit journal says by
whom), a shard given to two processes at once commits nothing twice, a shard killed mid-run and
restarted finishes the run, and ``reduce`` equals a single-process run bit for bit. Every process
runs with one thread, so the single-process run computes the very same floats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers.corpus_fixtures import write_conllu
from helpers.tiny_models import TL_MAJOR, save_hf_folder

from tl_normmix.corpus.store import Store

pytestmark = pytest.mark.skipif(
    TL_MAJOR < 4, reason="workers load the model from a folder: TransformerLens 4.x (CI runs it)"
)
ARGS = ["--scopes", "attn_w,attn_n", "--chunk-size", "1", "--batch-size", "1", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _start(folder, corpus, out, *extra):
    code = "import sys; from tl_normmix.cli import main; sys.exit(main())"
    argv = ["corpus", "analyse", "--model", str(folder), "--conllu", str(corpus), "--out",
            str(out), *ARGS, *extra]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=ENV, stderr=subprocess.PIPE, text=True
    )


def _wait(processes):
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err


def _reduce(out):
    subprocess.run(
        [sys.executable, "-c", "import sys; from tl_normmix.cli import main; sys.exit(main())",
         "corpus", "reduce", str(out)],
        env=ENV, check=True, capture_output=True,
    )  # fmt: skip


def _summary(out):
    return {name: pd.read_parquet(out / "summary" / f"{name}.parquet") for name in ("agg", "top")}


def _same(a, b):
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model's folder, a corpus of 24 one-sentence chunks and its single-process run."""
    root = tmp_path_factory.mktemp("shards")
    folder = save_hf_folder("gpt2", root)
    corpus = write_conllu(root / "c.conllu", n=24)
    _wait([_start(folder, corpus, root / "single")])
    return folder, corpus, root, _summary(root / "single")


@pytest.mark.parametrize("round_", [0, 1])
def test_shards_started_together_commit_each_chunk_once(run, round_):
    folder, corpus, root, single = run
    out = root / f"together-{round_}"
    shards = [_start(folder, corpus, out, "--shard", f"{k}/4") for k in range(4)]
    twice = _start(folder, corpus, out, "--shard", "1/4")  # the same shard, at the same time
    _wait([*shards, twice])
    store = Store(out)
    chunks = [chunk for chunk, _, _ in store.commits()]
    assert sorted(chunks) == list(range(24)), "a chunk committed twice or never"
    assert store.orphans() == [] and not list(out.glob("**/.tmp-*"))
    _reduce(out)
    _same(single, _summary(out))


def test_a_shard_killed_and_restarted_finishes_the_run(run):
    folder, corpus, root, single = run
    out = root / "killed"
    shards = [_start(folder, corpus, out, "--shard", f"{k}/3") for k in range(3)]
    victim = shards[0]
    deadline = time.monotonic() + 300
    while not [c for c, _, pid in Store(out).commits() if pid == victim.pid]:
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _wait(shards[1:])
    assert len(Store(out).done()) < 24
    _wait([_start(folder, corpus, out, "--shard", "0/3")])
    store = Store(out)
    assert sorted(chunk for chunk, _, _ in store.commits()) == list(range(24))
    _reduce(out)
    _same(single, _summary(out))

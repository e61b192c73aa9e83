"""A ``tl-normmix corpus analyse`` process killed by SIGKILL or stopped by Ctrl-C (SIGINT), then
resumed, equals an uninterrupted run bit for bit; the CLI's status, reduce and report commands."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers.corpus_fixtures import write_conllu
from helpers.tiny_models import TL_MAJOR, save_hf_folder

import tl_normmix as nm
from tl_normmix.cli import main

pytestmark = pytest.mark.skipif(
    TL_MAJOR < 4, reason="workers load the model from a folder: TransformerLens 4.x (CI runs it)"
)
ARGS = ["--scopes", "attn_w,attn_n", "--chunk-size", "2", "--batch-size", "2", "--quiet"]


def _argv(folder, corpus, out):
    """``tl-normmix corpus analyse`` arguments."""
    return ["corpus", "analyse", "--model", str(folder), "--conllu", str(corpus), "--out",
            str(out), *ARGS]  # fmt: skip


def _command(folder, corpus, out):
    code = "import sys; from tl_normmix.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *_argv(folder, corpus, out)]


def _interrupt(command, out, sig) -> int:
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((out / "parts" / "agg").glob("chunk-*"))) < 3:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    process.wait(60)
    return process.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_an_interrupted_process_resumes_to_the_same_result(sig, hf_root, tmp_path):
    folder = save_hf_folder("gpt2", hf_root)
    corpus = write_conllu(tmp_path / "c.conllu", n=120)
    whole = nm.corpus.analyse(
        str(folder),
        corpus,
        tmp_path / "whole",
        ("attn_w", "attn_n"),
        nm.corpus.CorpusConfig(chunk_size=2, batch_size=2, progress=False),
    )
    out = tmp_path / "cut"
    code = _interrupt(_command(folder, corpus, out), out, sig)
    assert code == (-9 if sig == signal.SIGKILL else 130)
    state = nm.corpus.status(out)
    assert 3 <= state["chunks_done"] < state["chunks"]
    subprocess.run(_command(folder, corpus, out), check=True)
    resumed = nm.corpus.load(out)
    for name in ("agg", "top", "sentences"):
        pd.testing.assert_frame_equal(
            getattr(whole, name), getattr(resumed, name), check_exact=True
        )


def test_status_reduce_and_report(hf_root, tmp_path, capsys):
    folder = save_hf_folder("bert", hf_root)
    corpus = write_conllu(tmp_path / "c.conllu", n=10)
    out = tmp_path / "run"
    argv = _argv(folder, corpus, out)
    assert main([*argv, "--shard", "0/2"]) == 0
    assert "the other shards remain" in capsys.readouterr().out
    assert main(["corpus", "status", str(out)]) == 0
    assert "3 / 5 chunks" in capsys.readouterr().out
    assert main(["corpus", "reduce", str(out)]) == 1
    assert "3 of 5 chunks done" in capsys.readouterr().err
    assert main([*argv, "--shard", "1/2"]) == 0
    assert main(["corpus", "reduce", str(out)]) == 0
    assert "10 analysed" in capsys.readouterr().out
    page = tmp_path / "corpus.html"
    assert main(["corpus", "report", str(out), "--out", str(page)]) == 0
    html = page.read_text()
    assert html.count("data:image/png") == 7  # six head grids and the layer profiles
    assert 'data-component="ColoredTokens"' in html and "Best head per relation" in html
    assert main(["corpus", "report", str(tmp_path / "nothing"), "--out", str(page)]) == 1
    assert "no summary yet" in capsys.readouterr().err
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tx\n", encoding="utf-8")
    assert (
        main(
            [
                "corpus",
                "analyse",
                "--model",
                str(folder),
                "--conllu",
                str(bad),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 1
    )
    assert "bad.conllu:1: expected 10 tab-separated fields" in capsys.readouterr().err

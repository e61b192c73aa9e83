"""The command line: the README's main job prints a per-layer table; bad input exits non-zero."""

from __future__ import annotations

import pytest

from tl_normmix.cli import main


@pytest.mark.real
def test_summary_on_packaged_model(capsys):
    assert (
        main(["summary", "--model", "all-MiniLM-L6-v2", "--text", "The cat sat on the mat."]) == 0
    )
    out = capsys.readouterr().out
    assert "BertForMaskedLM, post_ln blocks" in out and "raw weights" in out
    table = out.splitlines()[2:]
    assert table[0].split()[:2] == ["layer", "mixing_ratio_attn_w"]
    assert [line.split()[0] for line in table[1:]] == [str(i) for i in range(6)]
    assert all("'[CLS]'@0" in line for line in table[2:6])


@pytest.mark.real
def test_summary_layers_and_text_file(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("A short text.", encoding="utf-8")
    assert main(["summary", "--model", "minilm", "--text-file", str(text), "--layers", "2,5"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:]
    assert [r.split()[0] for r in rows] == ["2", "5"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "all-MiniLM-L6-v2", "--text", "   "], "text is empty"),
        (["--model", "./no/such/folder", "--text", "x"], "No such file or folder"),
        (["--model", "missing.gguf", "--text", "x"], "No such file or folder"),
    ],
)
def test_bad_input_exits_non_zero(args, message, capsys):
    assert main(["summary", *args]) == 2
    assert message in capsys.readouterr().err

"""The command line: the per-layer table; exit status 1 for a runtime error (one line, the fix
named, no traceback), 2 for a usage error; --version; help texts complete."""

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
def test_a_runtime_error_exits_1_with_one_line(args, message, capsys):
    assert main(["summary", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("tl-normmix: error:")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["report", "--model", "m", "--text", "x", "--out", "o.html", "--scopes", "attn_x"],
            "unknown scope(s) attn_x; choose from attn_w",
        ),
        (["summary", "--model", "m", "--text", "x", "--dtype", "float64"], "invalid choice"),
        (["summary", "--model", "m", "--text", "x", "--device", "gpu"], "choose from auto, cpu"),
        (["summary", "--model", "m", "--text", "x", "--layers", "one"], "expected integers"),
        (
            ["corpus", "analyse", "--model", "m", "--conllu", "f", "--out", "d", "--engine", "x"],
            "invalid choice",
        ),
        (["nothing"], "invalid choice"),
    ],
)
def test_a_usage_error_exits_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_version_and_complete_help(capsys):
    import tl_normmix

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"tl-normmix {tl_normmix.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "``" not in help_text and "analyses over CoNLL-U treebanks" in help_text
    for command in ("report", "patch", "summary"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--device" in text and "--dtype" in text and "{float32,bfloat16,float16}" in text


def test_an_interrupt_mentions_chunks_only_where_they_exist(monkeypatch, capsys):
    from tl_normmix import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_report", interrupted)
    assert main(["report", "--model", "m", "--text", "x", "--out", "o.html"]) == 130
    assert capsys.readouterr().err.strip() == "tl-normmix: interrupted."


def test_out_of_gpu_memory_names_the_option_to_lower(monkeypatch, capsys):
    import torch

    from tl_normmix import cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "_report", oom)
    assert main(["report", "--model", "m", "--text", "x", "--out", "o.html"]) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "--dtype bfloat16" in err and len(err.splitlines()) == 1

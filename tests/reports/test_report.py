"""The HTML report: its contents on every tiny model and a real one; bad input leaves nothing."""

from __future__ import annotations

import re

import pytest
from helpers import tiny_models
from test_page import REMOTE

import tl_normmix as nm
from tl_normmix.cli import main
from tl_normmix.reports import io, report

TEXT = "The keys to the cabinet are on the table."


def _count(html: str, component: str) -> int:
    return html.count(f'data-component="{component}"')


def test_report_on_every_tiny_model(case, model):
    n_layers = nm.adapt(model).spec.n_layers
    scopes = report.default_scopes(model)
    html = report.build_report(model, tiny_models.tokens(1, 7), progress=False)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert _count(html, "AttentionPattern") == n_layers * len(scopes)
    assert _count(html, "AttentionHeads") == n_layers * 2  # attn_w and attn_n per head
    # value norms per layer; methods compared and ALTI routes for the last token
    assert _count(html, "ColoredTokensMulti") == n_layers + 2
    assert "Methods compared" in html and "ALTI routes per layer" in html
    for method in ("attention rollout", "ALTI", "value zeroing (rollout)", "layer_n (last layer)"):
        assert method in html
    if case.family == "deepseek_v3":  # multi-head latent attention: values not linear in x
        assert "decompose_model: " in html
    else:
        assert "decompose_model (last layer)" in html
    assert _count(html, "ColoredTokens") == 2 * n_layers
    assert html.count("var CircuitsVis") == 1 and REMOTE.search(html) is None
    assert html.count('src="data:image/png;base64,') == 3
    residuals = re.search(r'<table class="tlnm-completeness">(.*?)</table>', html).group(1)
    values = [float(x) for x in re.findall(r"<td>([0-9.e+-]+)</td>", residuals)]
    assert len(values) == n_layers
    assert max(values) < 1e-4  # routing switches are cut out of the path, so mixtures are exact too
    if tiny_models.mlp_of(case) == "module":
        assert "the path cut where a router read off the module switches experts" in html
    assert "TransformerLens</th>" in html and "weight convention" in html
    assert "identities checked on this run" in html


def test_long_texts_leave_the_matrices_out_and_say_so(monkeypatch, hf_root):
    model = tiny_models.build(tiny_models.Case("gpt2", "raw"), hf_root)
    monkeypatch.setattr(report, "HEADS_MAX_TOKENS", 5)
    monkeypatch.setattr(report, "MATRIX_MAX_TOKENS", 6)
    html = report.build_report(model, tiny_models.tokens(1, 6), scopes=["attn_w", "attn_n"])
    assert _count(html, "AttentionHeads") == 0 and _count(html, "AttentionPattern") == 2 * 2
    assert "the per-head maps are left out" in html
    html = report.build_report(model, tiny_models.tokens(1, 7), scopes=["attn_w", "attn_n"])
    assert _count(html, "AttentionHeads") == 0 and _count(html, "AttentionPattern") == 0
    assert "the methods are compared up to 6 tokens" in html
    # above MATRIX_MAX_TOKENS: statistics computed during the forward pass, per layer
    assert "the maps (n² per layer) are not kept" in html and "Where tokens read from" in html
    assert html.count("strongest sources (share of its row)") == 2
    assert _count(html, "ColoredTokensMulti") == 2  # value norms per layer


def test_write_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    io.write_atomic(target, "complete")
    assert target.read_text() == "complete"

    def broken_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.write_atomic(target, "new text")
    assert target.read_text() == "complete"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left


def test_output_path_is_checked_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.check_output_path(tmp_path / "missing" / "r.html")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        io.check_output_path(tmp_path)
    assert io.check_output_path(tmp_path / "r.html") == tmp_path / "r.html"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "all-MiniLM-L6-v2", "--text", "  "], "text is empty"),
        (["--model", "./no/such/folder", "--text", "x"], "expected a packaged model"),
    ],
)
def test_bad_input_exits_non_zero_and_writes_nothing(args, message, tmp_path, capsys):
    assert main(["report", *args, "--out", str(tmp_path / "r.html"), "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_usage_error_exits_2_and_writes_nothing(tmp_path, capsys):
    args = ["--model", "all-MiniLM-L6-v2", "--text", "x", "--layers", "a"]
    with pytest.raises(SystemExit) as exit:
        main(["report", *args, "--out", str(tmp_path / "r.html"), "--quiet"])
    assert exit.value.code == 2 and "expected integers" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "no" / "r.html"
    assert main(["report", "--model", "never-loaded", "--text", "x", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "loading" not in err


@pytest.mark.real
def test_report_on_packaged_model(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "--model", "all-MiniLM-L6-v2", "--text", TEXT, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert "sentence-transformers/all-MiniLM-L6-v2 (BertForMaskedLM, post_ln blocks)" in html
    assert "raw (unprocessed) weights" in html
    assert _count(html, "AttentionPattern") == 6 * 5 and _count(html, "AttentionHeads") == 12
    assert "[CLS] the keys to the cabinet" in html
    assert REMOTE.search(html) is None and "http://" not in html.split("<script>")[0]
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.real
def test_a_target_on_an_encoder_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "report.html"
    args = ["report", "--model", "minilm", "--text", TEXT, "--out", str(out), "--quiet"]
    assert main([*args, "--target", "cabinet"]) == 1
    err = capsys.readouterr().err
    assert "masked-LM head is not linear" in err and "Traceback" not in err and not out.exists()
    assert main([*args, "--foil", "cabinet"]) == 1
    assert "A foil needs a target" in capsys.readouterr().err


@pytest.mark.real
def test_text_longer_than_the_context(tmp_path, capsys):
    out = tmp_path / "r.html"
    args = ["report", "--model", "minilm", "--text", "word " * 600, "--out", str(out), "--quiet"]
    assert main(args) == 1
    assert "602 tokens but" in capsys.readouterr().err and not out.exists()
    cheap = ["--layers", "0", "--scopes", "attn_w,attn_n"]
    assert main([*args, "--truncate", *cheap]) == 0
    assert "512 tokens" in capsys.readouterr().out
    assert "<th>tokens</th><td style='text-align:left'>512</td>" in out.read_text()


@pytest.mark.real
def test_failure_while_rendering_leaves_nothing(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("rendering failed")

    monkeypatch.setattr(report.views, "value_norms", broken)
    args = ["report", "--model", "minilm", "--text", TEXT, "--out", str(tmp_path / "r.html")]
    assert main([*args, "--quiet"]) == 1
    assert "rendering failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

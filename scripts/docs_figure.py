"""Draw the picture of the README and the docs' home page: on all-MiniLM-L6-v2, the share of each
layer's attention that goes to ``[CLS]``, by weight (``attn_w``) and by the norm of what it writes
(``attn_n``), averaged over the first 50 sentences of EWT dev.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/docs_figure.py   # writes docs/assets/sink.png
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from helpers.data import ewt_sentences  # noqa: E402

import tl_normmix as nm  # noqa: E402


def main() -> None:
    model = nm.load_model("all-MiniLM-L6-v2")
    shares = []
    for text in ewt_sentences(50):
        tokens = model.to_tokens(text)
        maps = nm.run_mixing_maps(model, tokens, ("attn_w", "attn_n"))
        shares.append(torch.stack([nm.analysis.sink_share(maps, s) for s in ("attn_w", "attn_n")]))
    mean = torch.stack(shares).mean(0)  # [scope, layer]
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    layers = range(mean.shape[1])
    ax.bar([x - 0.2 for x in layers], mean[0], width=0.4, label="by weight (attn_w)")
    ax.bar([x + 0.2 for x in layers], mean[1], width=0.4, label="by norm (attn_n)")
    ax.set_xlabel("layer")
    ax.set_ylabel("share to [CLS]")
    ax.set_xticks(list(layers))
    ax.set_title("all-MiniLM-L6-v2, 50 EWT sentences: attended to, writes little")
    ax.legend(frameon=False)
    out = ROOT / "docs" / "assets" / "sink.png"
    fig.savefig(out)
    print(f"wrote {out}: weight {mean[0].tolist()}, norm {mean[1].tolist()}")


if __name__ == "__main__":
    main()

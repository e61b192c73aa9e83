"""Run ``run_mixing_maps`` in this process and print, as JSON, its measured peak memory beyond the
model (resident set sampled every 0.5 ms, the second of two identical runs) next to
``estimate_bytes``. Large allocations go straight to the system (the ``MALLOC_*`` environment the
test sets), so the resident set follows live tensors.

    python tests/maps/peak_memory.py ROOT FAMILY BATCH SCOPE [SCOPE ...]
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.tiny_models import Case, build

import tl_normmix as nm
from tl_normmix.decompose.whole_layer import hidden_width
from tl_normmix.maps import streaming
from tl_normmix.maps.scopes import WHOLE_LAYER_SCOPES


def peak(run) -> int:
    process = psutil.Process()
    gc.collect()
    base = process.memory_info().rss
    high, stop = [base], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            high[0] = max(high[0], process.memory_info().rss)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out = run()
    finally:
        stop.set()
        watcher.join()
    del out
    return high[0] - base


def main() -> None:
    root, family, batch, scopes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    model = build(Case(family, "raw"), root)
    pos = model.cfg.n_ctx
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=generator)

    def run() -> nm.MixingMaps:
        return nm.run_mixing_maps(model, tokens, scopes, progress=False, check_memory=False)

    peak(run)  # the first run at a size: the allocator's and the model's one-time buffers
    measured = peak(run)
    cfg = model.cfg
    whole = None
    if set(scopes) & set(WHOLE_LAYER_SCOPES):
        whole = (cfg.d_model, hidden_width(nm.adapt(model).feed_forward(0)))
    estimate = streaming.estimate_bytes(
        batch, pos, cfg.n_heads, len(scopes), cfg.n_layers, whole_layer=whole
    )
    print(json.dumps({"measured": measured, "estimate": estimate}))


if __name__ == "__main__":
    main()

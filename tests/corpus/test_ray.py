"""``engine="ray"`` on a local multi-node Ray cluster (head + 2 nodes with a logical GPU each,
``ray.cluster_utils.Cluster``) equals the local engine bit for bit, and ``import tl_normmix``
never imports Ray."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from helpers.corpus_fixtures import write_conllu
from helpers.tiny_models import TL_MAJOR, save_hf_folder

import tl_normmix as nm

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(TL_MAJOR < 4, reason="actors load the model from a folder: TL 4.x"),
]


def test_importing_tl_normmix_does_not_import_ray():
    code = "import sys, tl_normmix; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ray_cluster_equals_the_local_engine(hf_root, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the extra tl_normmix[ray] is installed in CI")
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    folder = save_hf_folder("gpt2", hf_root)
    corpus = write_conllu(tmp_path / "c.conllu", n=24)
    options = dict(chunk_size=4, batch_size=4, progress=False)
    config = nm.corpus.CorpusConfig(**options)
    local = nm.corpus.analyse(str(folder), corpus, tmp_path / "local", ("attn_w", "attn_n"), config)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)  # logical GPUs: the scheduling path
    try:
        distributed = nm.corpus.analyse(
            str(folder),
            corpus,
            tmp_path / "ray",
            ("attn_w", "attn_n"),
            nm.corpus.CorpusConfig(
                engine="ray",
                address=cluster.address,
                actors=2,
                cpus_per_actor=1,
                gpus_per_actor=1,
                **options,
            ),
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    for name in ("agg", "top", "sentences"):
        pd.testing.assert_frame_equal(
            getattr(local, name), getattr(distributed, name), check_exact=True
        )

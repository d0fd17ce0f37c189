"""The likelihood split of experiments/coarse_nll.py, by hand in float64: a cluster's probability is its members'
sum, the within-cluster NLL renormalises among the true token's cluster, and coarse plus within-cluster NLL is the
fine NLL (the chain rule the script's `*_fine_nll` rests on)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "coarse_nll.py"


def load_script():
    spec = importlib.util.spec_from_file_location("coarse_nll_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coarse_plus_within_cluster_nll_is_the_fine_nll():
    script = load_script()
    torch.manual_seed(0)
    cluster_of = torch.tensor([0, 2, 1, 0, 2, 2])  # V = 6 fine tokens in K = 3 clusters
    log_probs = torch.randn(2, 3, 6, dtype=torch.float64).log_softmax(-1)
    fine = torch.tensor([[0, 1, 2], [3, 4, 5]])
    coarse = cluster_of[fine]

    clusters = script.cluster_log_probs(log_probs, cluster_of, 3)
    probs = log_probs.exp()
    assert torch.allclose(clusters.exp()[..., 2], probs[..., 1] + probs[..., 4] + probs[..., 5])

    within = script.within_cluster_nll(log_probs, clusters, fine, coarse)
    by_hand = 0.0
    for b in range(2):
        for t in range(3):
            members = cluster_of == coarse[b, t]
            by_hand -= float(probs[b, t, fine[b, t]].log() - probs[b, t, members].sum().log())
    assert abs(within - by_hand) < 1e-9

    coarse_nll, _ = script.coarse_nll(clusters, coarse)
    fine_nll = -float(log_probs.gather(-1, fine[..., None]).sum())
    assert abs(coarse_nll + within - fine_nll) < 1e-9

"""benchmarks/frontier.py's verdict: CTF dominates only when every baseline point, at every batch size, has a CTF
point with a lower FID and at least its images/s."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"
spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
frontier = importlib.util.module_from_spec(spec)
spec.loader.exec_module(frontier)


def point(name, method, fid, speed):
    return {"name": name, "method": method, "fid": fid, "images_per_s": {str(b): speed * b for b in frontier.BATCHES}}


def test_pareto_needs_a_better_and_as_fast_ctf_point_for_every_baseline_point():
    base = [point("b-small", "baseline", 40, 10), point("b-large", "baseline", 30, 4)]
    fast_good = point("c-small", "ctf", 39, 10)  # as fast as b-small, better
    assert frontier.pareto(base + [fast_good])["ctf_dominates_baseline"] is False  # nothing beats b-large
    verdict = frontier.pareto(base + [fast_good, point("c-large", "ctf", 29, 4.5)])
    assert verdict["ctf_dominates_baseline"] is True
    assert verdict["dominating_ctf_points"]["b-large @ batch 64"] == ["c-large"]
    # equal FID is not better; slower is not enough
    assert not frontier.pareto(base + [point("c", "ctf", 30, 100), point("d", "ctf", 1, 3.9)])["ctf_dominates_baseline"]

"""The frontier's verdict (experiments/frontier.py): CTF dominates only when every baseline point, at every batch
size, has a CTF point with a lower FID and at least its images/s; and a point's parts are loaded from its own
pipeline when it names one."""

import importlib.util
import json
from pathlib import Path

import torch

from ctfgen.evaluation.frontier import goal, pareto
from ctfgen.pipeline import CTFPipeline
from test_pipeline import make_parts

ROOT = Path(__file__).resolve().parent.parent

BATCHES = (1, 16, 64)


def point(name, method, fid, speed):
    return {"name": name, "method": method, "fid": fid, "images_per_s": {str(b): speed * b for b in BATCHES}}


def test_pareto_needs_a_better_and_as_fast_ctf_point_for_every_baseline_point():
    base = [point("b-small", "baseline", 40, 10), point("b-large", "baseline", 30, 4)]
    fast_good = point("c-small", "ctf", 39, 10)  # as fast as b-small, better
    assert pareto(base + [fast_good])["ctf_dominates_baseline"] is False  # nothing beats b-large
    verdict = pareto(base + [fast_good, point("c-large", "ctf", 29, 4.5)])
    assert verdict["ctf_dominates_baseline"] is True
    assert verdict["dominating_ctf_points"]["b-large @ batch 64"] == ["c-large"]
    every = {f"{name} @ batch {b}" for name in ("b-small", "b-large") for b in BATCHES}
    assert set(verdict["dominating_ctf_points"]) == every  # each baseline point at each batch size
    # equal FID is not better; slower is not enough
    assert not pareto(base + [point("c", "ctf", 30, 100), point("d", "ctf", 1, 3.9)])["ctf_dominates_baseline"]


def test_goal_is_the_best_baselines_fid_at_nine_tenths_of_its_speed_at_batch_64():
    points = [point("b-small", "baseline", 40, 10), point("b-large", "baseline", 30, 4),
              point("ties", "ctf", 30, 3.6),            # equal FID at exactly 0.9x: meets it
              point("slow", "ctf", 20, 3.5),            # better, but 0.875x
              point("worse", "ctf", 30.5, 100)]         # fast, but FID above
    verdict = goal(points)
    assert verdict["baseline"] == "b-large" and verdict["meeting_goal"] == ["ties"]
    assert verdict["ctf_points"]["slow"] == {"fid_over_baseline": 20 / 30, "speed_over_baseline": 3.5 / 4}


def load_frontier_script():
    spec = importlib.util.spec_from_file_location("frontier_script", ROOT / "experiments" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_point_naming_its_own_pipeline_is_that_pipelines_baseline_or_ctf(tmp_path):
    """A baseline of another vocabulary comes with its own tokenizer, not the shared one."""
    frontier = load_frontier_script()
    shared, own = CTFPipeline(**make_parts(seed=0)), CTFPipeline(**make_parts(seed=1))
    shared.save_pretrained(tmp_path / "shared")
    own.save_pretrained(tmp_path / "own")
    spec = {"pipeline": str(tmp_path / "shared"), "points": [
        {"name": "b", "method": "baseline", "pipeline": str(tmp_path / "own")},
        {"name": "c", "method": "ctf", "pipeline": str(tmp_path / "own")},
        {"name": "shared b", "method": "baseline", "baseline": str(tmp_path / "shared" / "baseline")}]}
    (tmp_path / "points.json").write_text(json.dumps(spec))
    baseline, ctf, shared_baseline = frontier.load_points(tmp_path / "points.json")

    assert frontier.parts_of(baseline) == [str(tmp_path / "own" / "baseline")]
    assert frontier.parts_of(ctf) == [str(tmp_path / "own" / "stage1"), str(tmp_path / "own" / "stage2")]
    for point in (baseline, ctf):
        assert torch.equal(point["pipe"].tokenizer.quantize.embedding.weight, own.tokenizer.quantize.embedding.weight)
    assert torch.equal(baseline["pipe"].baseline.output.weight, own.baseline.output.weight)
    assert torch.equal(shared_baseline["pipe"].tokenizer.quantize.embedding.weight,
                       shared.tokenizer.quantize.embedding.weight)

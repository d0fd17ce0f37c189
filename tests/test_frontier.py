"""The frontier's verdict (experiments/frontier.py): CTF dominates only when every baseline point, at every batch
size, has a CTF point with a lower FID and at least its images/s."""

from ctfgen.evaluation.frontier import goal, pareto

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

"""The speed-quality verdict of a set of models (`experiments/frontier.py` measures the points).

A point is a dict with its "name", "method" ("ctf" or "baseline"), "fid" and "images_per_s" at each batch size
({batch: images/s}). CTF dominates the baseline when every baseline point, at every batch size it was timed at,
has a CTF point with a lower FID and at least its images/s. The weaker goal a CTF point can meet alone (issue 21):
FID at or below the best baseline's, at no less than 0.9x its images/s at batch 64.
"""

from __future__ import annotations


def pareto(points: list[dict]) -> dict:
    """For each baseline point and batch size, the CTF points with a lower FID and at least its images/s."""
    ctf = [p for p in points if p["method"] == "ctf"]
    verdict, dominated = {}, True
    for base in (p for p in points if p["method"] == "baseline"):
        for b in base["images_per_s"]:
            better = [c["name"] for c in ctf
                      if c["fid"] < base["fid"] and c["images_per_s"][b] >= base["images_per_s"][b]]
            verdict[f"{base['name']} @ batch {b}"] = better
            dominated &= bool(better)
    return {"ctf_dominates_baseline": dominated, "dominating_ctf_points": verdict}


def goal(points: list[dict], batch: str = "64", speed_share: float = 0.9) -> dict:
    """The CTF points with FID at or below the best baseline point's and at least `speed_share` of its images/s at
    `batch`; each CTF point's FID and speed over that baseline's."""
    best = min((p for p in points if p["method"] == "baseline"), key=lambda p: p["fid"])
    ratios = {c["name"]: {"fid_over_baseline": c["fid"] / best["fid"],
                          "speed_over_baseline": c["images_per_s"][batch] / best["images_per_s"][batch]}
              for c in points if c["method"] == "ctf"}
    meeting = [name for name, r in ratios.items()
               if r["fid_over_baseline"] <= 1 and r["speed_over_baseline"] >= speed_share]
    return {"baseline": best["name"], "batch": int(batch), "speed_share": speed_share, "ctf_points": ratios,
            "meeting_goal": meeting}

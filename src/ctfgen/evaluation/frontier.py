"""The speed-quality verdict of a set of models (`experiments/frontier.py` measures the points).

A point is a dict with its "name", "method" ("ctf" or "baseline"), "fid" and "images_per_s" at each batch size
({batch: images/s}). CTF dominates the baseline when every baseline point, at every batch size it was timed at,
has a CTF point with a lower FID and at least its images/s.
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

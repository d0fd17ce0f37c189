"""The vocabulary sweep's summary (experiments/vocab_sweep.py), on result files written here by hand: one row per
model and V with every draw, the coarse NLL joined to its CTF row, the verdict on the gap, a second training of
one V set beside the first without moving the verdict, and a tokenizer reported before its models are."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "vocab_sweep.py"
METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")


def table(baseline_fids, ctf):
    """table1.py's file: a baseline row and CTF rows {name: (k, fids)}, the other metrics constant."""
    def entry(mode, fids, k=None):
        draws = [{"seed": s, **{m: 1.0 for m in METRICS}, "fid": f} for s, f in enumerate(fids)]
        return {"pipeline": "p", "mode": mode, "draws": draws, **({"k": k} if k else {})}
    rows = {"baseline": entry("baseline", baseline_fids)}
    for name, (k, fids) in ctf.items():
        rows[name] = entry("ctf", fids, k) | {"fid_over_baseline": (sum(fids) / len(fids)) /
                                                                    (sum(baseline_fids) / len(baseline_fids))}
    return {"rows": rows}


def run(results: Path, out: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--out", str(out)], check=True,
                   capture_output=True)
    return json.loads(out.read_text())


def test_rows_draws_nll_and_a_shrinking_gap(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table1_v1024.json").write_text(json.dumps(table([30, 32, 31], {"ctf_k32": (32, [45, 45, 48]),
                                                                               "ctf_k128": (128, [40, 41, 42])})))
    (results / "table1_v16384.json").write_text(json.dumps(table([40, 40, 40], {"ctf_k512": (512, [38, 39, 37])})))
    (results / "coarse_nll_v1024_k32.json").write_text(json.dumps({"stage1_coarse_nll": 1.5,
                                                                   "baseline_coarse_nll": 1.2,
                                                                   "ctf_fine_nll": 4.0, "tokens": 9}))
    (results / "tokenizer_v1024.json").write_text(json.dumps({"psnr": 25.0, "codebook_usage": 0.5,
                                                              "codes_used": 512}))
    result = run(results, tmp_path / "sweep.json")

    assert [(r["vocab_size"], r["model"], r["k"]) for r in result["rows"]] == [
        (1024, "baseline", None), (1024, "ctf", 32), (1024, "ctf", 128), (16384, "baseline", None),
        (16384, "ctf", 512)]
    k32 = result["rows"][1]
    assert k32["fid"] == [45, 45, 48] and k32["fid_mean"] == 46 and abs(k32["fid_std"] - 3 ** 0.5) < 1e-12
    assert (k32["stage1_coarse_nll"], k32["baseline_coarse_nll"], k32["ctf_fine_nll"]) == (1.5, 1.2, 4.0)
    assert "tokens" not in k32 and "baseline_fine_nll" not in k32  # the NLLs only, those the file has
    assert "stage1_coarse_nll" not in result["rows"][2]  # no file for K = 128
    assert result["tokenizers"][0] == {"vocab_size": 1024, "training": 1, "psnr": 25.0, "codebook_usage": 0.5,
                                       "codes_used": 512, "rfid": None}
    assert result["missing"] == [4096]
    verdict = result["verdict"]
    assert verdict["best_ctf_fid_over_baseline"] == {"1024": 41 / 31, "16384": 38 / 40}  # the better K per V
    assert verdict["gap_shrinks_with_vocab"] is True and verdict["ctf_beats_baseline_at"] == [16384]
    assert verdict["ctf_ties_baseline_at"] == []  # 38 +- 1 against 40 +- 0: apart


def test_a_gap_that_grows_is_reported_as_such(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table1_v1024.json").write_text(json.dumps(table([30, 30], {"ctf_k32": (32, [33, 33])})))
    (results / "table1_v4096.json").write_text(json.dumps(table([30, 30], {"ctf_k128": (128, [36, 36])})))
    verdict = run(results, tmp_path / "sweep.json")["verdict"]
    assert verdict["gap_shrinks_with_vocab"] is False and verdict["ctf_beats_baseline_at"] == []
    assert verdict["ctf_ties_baseline_at"] == []


def test_a_lower_mean_within_the_draws_spread_is_a_tie_not_a_win(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table1_v1024.json").write_text(json.dumps(table([30, 30, 30], {"ctf_k32": (32, [36, 36, 36])})))
    (results / "table1_v16384.json").write_text(json.dumps(table([40, 41, 39], {"ctf_k512": (512, [39, 40, 40.5])})))
    verdict = run(results, tmp_path / "sweep.json")["verdict"]
    assert verdict["best_ctf_fid_over_baseline"]["16384"] < 1  # a lower mean, 39.83 against 40, std 0.76 and 1
    assert verdict["ctf_beats_baseline_at"] == [] and verdict["ctf_ties_baseline_at"] == [16384]


def test_a_second_training_is_its_own_row_and_not_the_verdict(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table1_v1024.json").write_text(json.dumps(table([30, 30], {"ctf_k32": (32, [33, 33])})))
    (results / "table1_v4096.json").write_text(json.dumps(table([30, 30], {"ctf_k128": (128, [45, 45]),
                                                                           "ctf_k512": (512, [44, 44])})))
    (results / "table1_v4096_t2.json").write_text(json.dumps(table([35, 35], {"ctf_k128": (128, [28, 28])})))
    (results / "coarse_nll_v4096_t2_k128.json").write_text(json.dumps({"stage1_coarse_nll": 2.0,
                                                                       "baseline_coarse_nll": 1.9}))
    (results / "tokenizer_v4096_t2.json").write_text(json.dumps({"psnr": 27.0}))
    (results / "tokenizer_v16384.json").write_text(json.dumps({"psnr": 28.0}))  # its models not measured yet
    result = run(results, tmp_path / "sweep.json")

    again = [r for r in result["rows"] if r["training"] == 2]
    assert [(r["vocab_size"], r["model"], r["k"]) for r in again] == [(4096, "baseline", None), (4096, "ctf", 128)]
    assert (again[1]["fid_mean"], again[1]["stage1_coarse_nll"]) == (28, 2.0)
    assert "stage1_coarse_nll" not in result["rows"][3]  # training 1's K = 128 has no NLL file of its own
    assert [(t["vocab_size"], t["training"], t["psnr"]) for t in result["tokenizers"]] == [
        (1024, 1, None), (4096, 1, None), (4096, 2, 27.0), (16384, 1, 28.0)]
    assert result["missing"] == [16384] and {r["vocab_size"] for r in result["rows"]} == {1024, 4096}
    # the verdict is training 1's: the second training's CTF, better than its baseline, does not make CTF win
    assert result["verdict"]["best_ctf_fid_over_baseline"] == {"1024": 1.1, "4096": 44 / 30}
    assert result["verdict"]["ctf_beats_baseline_at"] == []
    assert result["training_noise"] == {"4096": {"baseline": {"fid_mean": [30, 35]},
                                                 "ctf_k128": {"fid_mean": [45, 28],
                                                              "fid_over_baseline": [1.5, 28 / 35]}}}


def test_a_fitted_pipeline_says_how_far_its_held_out_loss_moved_in_the_last_quarter(tmp_path):
    """Convergence, as the sweep defines it: from the first held-out measurement at or after three quarters of the
    steps to the last, per model of the row, read from the fit's report.json beside the pipeline."""
    results, fitted = tmp_path / "results", tmp_path / "fit"
    results.mkdir(), fitted.mkdir()
    steps = [100, 200, 300, 400]
    curves = {"stage1": [3.0, 2.5, 2.2, 2.15], "stage2": [2.0, 1.9, 1.8, 1.81], "baseline": [4.0, 3.0, 2.9, 2.5]}
    report = {"training": {stage: {"steps": steps, "eval_loss": losses} for stage, losses in curves.items()}}
    (fitted / "report.json").write_text(json.dumps(report))
    tables = table([30, 30], {"ctf_k32": (32, [33, 33])})
    tables["rows"]["ctf_k32"]["pipeline"] = str(fitted / "pipeline")
    (results / "table1_v1024.json").write_text(json.dumps(tables))
    baseline, ctf = run(results, tmp_path / "sweep.json")["rows"]
    assert "held_out_loss_moved_last_quarter" not in baseline  # its pipeline "p" has no report beside it
    moved = ctf["held_out_loss_moved_last_quarter"]
    assert moved.keys() == {"stage1", "stage2"}
    assert abs(moved["stage1"] - (2.15 - 2.2)) < 1e-12 and abs(moved["stage2"] - (1.81 - 1.8)) < 1e-12

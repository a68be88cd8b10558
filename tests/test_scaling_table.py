"""The scaling report's aggregation on hand-made points: speed-ups, efficiency, cache retention,
reused-step collectives, failed points (runner/scaling/table.py)."""

import csv
import json
import os

import pytest

from runner.scaling import table

STEPS = 4


def make_point(study, pid, gpus, layout, cache, sampling, pattern="CCCC", status="ok", error=None, ranks=None,
               reused_collectives=0, warmup=1):
    d = os.path.join(study, "points", pid)
    os.makedirs(os.path.join(d, "out"))
    rec = {"id": pid, "gpus": gpus, "layout": layout, "cache": cache, "cfg_parallel": False, "sp": gpus,
           "status": status, "warmup_videos": warmup, "videos": warmup + len(sampling)}
    if error:
        rec["error"] = error
    with open(os.path.join(d, "point.json"), "w") as f:
        json.dump(rec, f)
    # the warm-up video is slow; the table must leave it out
    for index, s in enumerate([100.0] * warmup + list(sampling)):
        per_step = {str(i): ({"all_to_all": {"count": 8, "bytes": 1000 * gpus}} if m == "C" and gpus > 1 else
                             ({"all_reduce": {"count": reused_collectives, "bytes": 16}} if reused_collectives else {}))
                    for i, m in enumerate(pattern)}
        ranks_ = [{"rank": r, "per_step": per_step, "memory": {"host_peak_rss_mb": 100.0 + r,
                   "phases": {"sampling": {"seconds": s, "cpu_s": s * 0.5}}}} for r in range(ranks or gpus)]
        rep = {"index": index, "output": os.path.join(d, "out", f"{index}.mp4"), "frames": {"count": 8, "height": 32, "width": 32},
               "config": {"seed": 1}, "step_times_s": [s / STEPS] * STEPS, "host": {"nodes": 1},
               "timings": {"setup_s": 1.0, "text_encoding_s": 0.5, "sampling_s": s, "decoding_s": 0.25, "writing_s": 0.25},
               "cache": {"pattern": pattern},
               "steps": {"computed": {"median_s": s / STEPS}, "reused": {"median_s": 0.01 if "R" in pattern else None}},
               "parallel": {"collectives_per_rank": ranks_}}
        with open(os.path.join(d, "out", f"{index}.json"), "w") as f:
            json.dump(rep, f)


@pytest.fixture
def study(tmp_path):
    s = str(tmp_path / "study")
    make_point(s, "n1-sp1-none", 1, None, "none", [10.0, 12.0, 11.0])
    make_point(s, "n1-sp1-adacache", 1, None, "adacache", [5.0, 5.0, 5.0], pattern="CRCR")
    make_point(s, "n2-dsp-none", 2, "dsp", "none", [6.0, 6.0, 6.0])
    make_point(s, "n2-dsp-adacache", 2, "dsp", "adacache", [4.0, 4.0, 4.0], pattern="CRCR")
    make_point(s, "n4-dsp-none", 4, "dsp", "none", [], status="failed", error="error: rank 3 died")
    return s


def by_point(rows):
    return {r["point"]: r for r in rows}


def test_speedup_efficiency_and_retention(study):
    rows = by_point(table.collect(study, psnr=False))
    # medians of the measured videos: 11 (1 GPU) and 6 (2 GPUs); the warm-up video's 100 s is left out
    assert rows["n1-sp1-none"]["sampling_s"] == 11.0
    assert rows["n2-dsp-none"]["speedup"] == pytest.approx(11 / 6)
    assert rows["n2-dsp-none"]["efficiency"] == pytest.approx(11 / 12)
    assert rows["n2-dsp-adacache"]["speedup"] == pytest.approx(5 / 4)
    # the cache's speed-up at each count and its retention (2 GPUs against 1)
    assert rows["n1-sp1-adacache"]["cache_speedup"] == pytest.approx(11 / 5)
    assert rows["n2-dsp-adacache"]["cache_speedup"] == pytest.approx(6 / 4)
    assert rows["n2-dsp-adacache"]["retention"] == pytest.approx((6 / 4) / (11 / 5))
    assert rows["n2-dsp-adacache"]["computed_steps"] == "2/4"
    assert rows["n2-dsp-adacache"]["bytes_per_computed_step"] == 2000
    assert rows["n2-dsp-adacache"]["reused_step_collectives"] == 0
    assert rows["n2-dsp-none"]["peak_mem_mb"] == 101.0  # the larger rank
    assert rows["n2-dsp-none"]["cores_per_rank"] == pytest.approx(0.5)
    assert rows["n2-dsp-none"]["e2e_s"] == pytest.approx(6 + 2.0)


def test_failed_point_is_shown_as_failed(study):
    rows = table.collect(study, psnr=False)
    failed = by_point(rows)["n4-dsp-none"]
    assert failed["status"] == "failed" and "rank 3 died" in failed["error"]
    md = table.markdown(rows, {})
    assert "n4-dsp-none: **failed**: error: rank 3 died" in md
    table.write(study, rows, {})
    with open(os.path.join(study, "scaling.csv")) as f:
        csv_rows = {r["point"]: r for r in csv.DictReader(f)}
    assert csv_rows["n4-dsp-none"]["status"] == "failed" and csv_rows["n4-dsp-none"]["sampling_s"] == ""
    assert float(csv_rows["n2-dsp-none"]["speedup"]) == pytest.approx(11 / 6)


def test_an_ok_point_without_reports_is_failed(study):
    make_point(study, "n3-dsp-none", 3, "dsp", "none", [], warmup=0)
    assert by_point(table.collect(study, psnr=False))["n3-dsp-none"]["status"] == "failed"


def test_collectives_on_reused_steps_are_counted(tmp_path):
    s = str(tmp_path / "s")
    make_point(s, "n2-dsp-adacache", 2, "dsp", "adacache", [4.0], pattern="CRCR", reused_collectives=2)
    row = table.collect(s, psnr=False)[0]
    # 2 reused steps x 2 collectives x 2 ranks: a policy breaking the rule shows up in the table
    assert row["reused_step_collectives"] == 8


def test_missing_study_is_a_clear_error(tmp_path, capsys):
    assert table.main([str(tmp_path / "nothing")]) == 2
    assert "no points/" in capsys.readouterr().err

"""``prhs-bench frontier``'s bookkeeping, with a stand-in evaluator (the real model's runs are
in tests/test_real_model.py): the recommendation rule and ``--resume``."""

import argparse
import json

import pytest

from prhs_compile.bench.evals import accuracy, frontier


def _rows(policy, budget, tau):
    """Rows as ``accuracy.evaluate`` returns them: a lower tau retrieves less and, below 0.5,
    loses the needle."""
    rate = 0.0 if policy != "prhs" else tau
    base = {"policy": policy, "budget": budget, "context": 64, "examples": 2, "retrieval_rate": rate,
            "dropped_mean": 0.0 if policy == "dense" else 0.1, "layer_retrieval_rate": {} if policy == "dense" else {"1": rate}}
    needle = 0.0 if policy == "prhs" and tau < 0.5 else 1.0
    top1 = 1.0 if policy == "dense" else min(1.0, 0.9 + tau / 5)
    return [{**base, "task": "passkey", "accuracy": needle},
            {**base, "task": "natural_text", "accuracy": 0.6, "kl_mean": 1.0 - top1, "kl_max": 1.0 - top1, "top1_agreement": top1}]


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def evaluate(model, codec, *, policies, budgets, extra, **_):
        calls.append((policies[0], budgets[0], extra.get("tau")))
        return _rows(policies[0], budgets[0], extra.get("tau", 0.8))

    monkeypatch.setattr(accuracy, "load", lambda *a: (None, None))
    monkeypatch.setattr(accuracy, "evaluate", evaluate)
    monkeypatch.setattr(frontier, "calibration_for", lambda *a: {"path": "cal.json", "suggested_tau": {"1": 0.7}})
    return calls


def _args(tmp_path, **kw):
    parser = argparse.ArgumentParser()
    frontier.add_arguments(parser)
    argv = ["--out", str(tmp_path / "f.json"), "--budgets", "16", "--taus", "0.3,0.6,0.9", "--policies", "oracle",
            "--tasks", "passkey,natural_text", "--device", "cpu"]
    for key, value in kw.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


def test_recommends_the_lowest_rate_within_noise_and_resume_runs_only_what_is_missing(fake, tmp_path):
    assert frontier.run(_args(tmp_path)) == 0
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["complete"] and len(report["cells"]) == 6  # dense, 3 taus, calibrated, oracle
    # tau 0.3 loses the needle; 0.6 is the cheapest that keeps every task
    assert report["recommended"]["label"] == "prhs tau=0.6"
    assert report["recommended_top1"]["label"] == "prhs tau=0.6"  # top-1 1.02 -> 1.0 >= 0.98
    assert "prhs tau=0.6" in (tmp_path / "f.md").read_text()
    # a resumed run with one more tau runs only the new cell ... once the settings match
    fake.clear()
    with pytest.raises(SystemExit, match="--resume"):
        frontier.run(_args(tmp_path, taus="0.3,0.6,0.8,0.9", resume=True))
    assert fake == []
    report["settings"]["taus"] = [0.3, 0.6, 0.8, 0.9]
    report["cells"] = [c for c in report["cells"] if c["label"] != "oracle"]
    (tmp_path / "f.json").write_text(json.dumps(report))
    assert frontier.run(_args(tmp_path, taus="0.3,0.6,0.8,0.9", resume=True)) == 0
    assert fake == [("prhs", 16, 0.8), ("oracle", 16, None)]
    resumed = json.loads((tmp_path / "f.json").read_text())
    assert [c["label"] for c in resumed["cells"]] == ["dense", "prhs tau=0.3", "prhs tau=0.6", "prhs tau=0.8",
                                                      "prhs tau=0.9", "prhs calibrated tau", "oracle"]
    assert len(resumed["rows"]) == 2 * len(resumed["cells"])


def test_pages_cells_add_to_a_report_and_stay_out_of_the_recommendation(fake, tmp_path, monkeypatch):
    assert frontier.run(_args(tmp_path)) == 0
    fake.clear()

    def evaluate(model, codec, *, policies, budgets, extra, **_):
        fake.append((policies[0], budgets[0], extra.get("tau"), extra.get("retrieval")))
        rows = _rows(policies[0], budgets[0], extra.get("tau", 0.8))
        for r in rows:  # cheaper than any exact cell: must still not be recommended
            r["retrieval_rate"] = 0.01
            r["two_stage"] = {"dropped_mean": 0.2, "exact_dropped_mean": 0.1, "outside_candidates": 0.3,
                              "missed_share": 0.5}
        return rows

    monkeypatch.setattr(accuracy, "evaluate", evaluate)
    assert frontier.run(_args(tmp_path, **{"pages-taus": "0.6", "pages-candidates": 2, "resume": True})) == 0
    assert fake == [("prhs", 16, 0.6, "pages"), ("oracle", 16, None, "pages")]
    report = json.loads((tmp_path / "f.json").read_text())
    assert [c["label"] for c in report["cells"]][-2:] == ["prhs tau=0.6 pages c=2", "oracle pages c=2"]
    assert report["recommended"]["label"] == "prhs tau=0.6"
    table = (tmp_path / "f.md").read_text()
    assert "| prhs tau=0.6 pages c=2 | 16 | 0.2000 | 0.1000 | 0.300 | 0.500 |" in table
    # Another candidate count adds its cells and keeps the first ones.
    fake.clear()
    assert frontier.run(_args(tmp_path, **{"pages-taus": "0.6", "pages-candidates": 4, "resume": True})) == 0
    assert fake == [("prhs", 16, 0.6, "pages"), ("oracle", 16, None, "pages")]
    labels = [c["label"] for c in json.loads((tmp_path / "f.json").read_text())["cells"]]
    assert {"prhs tau=0.6 pages c=2", "oracle pages c=2", "prhs tau=0.6 pages c=4", "oracle pages c=4"} <= set(labels)
    # Sketch cells add theirs too; the report lists every run and the cells each added.
    fake.clear()
    assert frontier.run(_args(tmp_path, **{"pages-taus": "0.6", "two-stage-retrieval": "sketch", "resume": True})) == 0
    assert fake == [("prhs", 16, 0.6, "sketch"), ("oracle", 16, None, "sketch")]
    report = json.loads((tmp_path / "f.json").read_text())
    assert {"prhs tau=0.6 sketch c=4", "oracle sketch c=4", "oracle pages c=2"} <= {c["label"] for c in report["cells"]}
    assert len(report["commands"]) == 4
    assert [(a["pages_candidates"], a["two_stage_retrieval"]) for a in report["settings"]["added_cells"]] == [
        (2, "pages"), (4, "pages"), (4, "sketch")]

"""The benchmark's output speaks to users: goals with measured values, a fresh run directory."""
import json
import os

import pytest

from palora_kernels import bench


def _result_with_goals():
    return dict(rows=[], memory=[], targets=[
        dict(what="linear fwd+bwd batch: time fused/base", value=1.013, bound=1.1, ok=True),
        dict(what="conv fwd+bwd sample: time fused/base", value=1.385, bound=1.3, ok=False)])


def test_goals_section_has_goal_and_measured_value_and_no_fail_wording():
    text = bench.format_tables(_result_with_goals(), bench.hardware(), bench.PROVIDERS)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("goals"))
    goals = lines[start + 1:]
    assert len(goals) == 2
    assert "goal <= 1.1" in goals[0] and "measured 1.013" in goals[0] and goals[0].endswith("met")
    assert "goal <= 1.3" in goals[1] and "measured 1.385" in goals[1] and goals[1].endswith("open")
    for word in ("FAIL", "PASS", "acceptance", "issue"):
        assert word not in text


def test_default_out_is_a_fresh_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--quick", "--no-memory", "--repeats", "1", "--cases", "linear", "--prefs", "batch",
            "--modes", "fwd", "--threads", "1"]
    assert bench.main(args) == 0
    assert bench.main(args) == 0
    runs = sorted(os.listdir(tmp_path / "bench_out"))
    assert len(runs) == 2, runs                      # the second run did not overwrite the first
    for run in runs:
        result = json.loads((tmp_path / "bench_out" / run / "bench.json").read_text())
        assert [r["case"] for r in result["rows"]] == ["linear"]
        assert "commit" in result["config"]


def test_plot_names_shapes_and_has_legends(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = bench.run_suite([bench.get_case("linear", quick=True)], ["batch"], ["fwd"], bench.PROVIDERS,
                             repeats=1, memory=False, threads=1)
    result["memory"] = [dict(case="linear", shape=result["rows"][0]["shape"], pref="batch", mode="fwd+bwd",
                             peak_bytes={p: 2**20 for p in bench.PROVIDERS}, ratios={})]
    saved = {}
    monkey_savefig = plt.Figure.savefig

    def grab(fig, path, **kw):
        saved["fig"] = fig
        return monkey_savefig(fig, path, **kw)

    plt.Figure.savefig = grab
    try:
        assert bench.plot(result, bench.hardware(), bench.PROVIDERS, str(tmp_path / "b.png")) is None
    finally:
        plt.Figure.savefig = monkey_savefig
    fig = saved["fig"]
    assert result["rows"][0]["shape"] in fig._suptitle.get_text()
    for ax in fig.axes:                               # both panels: lower is better, full legend
        assert "lower is better" in ax.get_title()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(labels) == len(bench.PROVIDERS), labels

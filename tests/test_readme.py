"""README.md cannot drift: its example runs as printed, and its tables match docs/bench.json."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not README.exists(), reason="needs a source checkout (README.md)")


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("```python\n", text.index("<!-- example")) + len("```python\n")
    return text[start:text.index("```\n", start)]


def test_readme_example_runs_and_shows_the_trade_off(tmp_path):
    code = _example()
    assert 8 <= len(code.strip().splitlines()) <= 20, "the README example should stay short"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = {}
    for line in out.stdout.splitlines():
        nums = [float(v) for v in re.findall(r"[-+0-9.e]+", line)]
        assert len(nums) == 4, f"expected '[p0, p1] [loss0, loss1]', got {line!r}"
        losses[tuple(nums[:2])] = nums[2:]
    # what README says the example shows: each task wins where the preference favours it
    assert losses[(0.9, 0.1)][0] < losses[(0.9, 0.1)][1], losses
    assert losses[(0.1, 0.9)][1] < losses[(0.1, 0.9)][0], losses
    assert losses[(0.9, 0.1)][0] < losses[(0.1, 0.9)][0], losses


def _make_readme():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_readme
    finally:
        sys.path.pop(0)
    return make_readme


def test_readme_tables_match_docs_bench_json():
    mk = _make_readme()
    text = README.read_text(encoding="utf-8")
    expected = mk.update(text, mk.render(mk.load()))
    assert text == expected, "README.md's tables differ from docs/bench.json: run python docs/make_readme.py"


def test_drift_is_caught():
    # the check itself must see a changed number
    mk = _make_readme()
    result = mk.load()
    row = result["rows"][0]
    text = mk.update(README.read_text(encoding="utf-8"), mk.render(result))
    row["times"]["fused"]["median_ms"] *= 1.5
    assert mk.update(text, mk.render(result)) != text

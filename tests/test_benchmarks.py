"""The CTC benchmark script runs and its correctness columns (against the float64 built-in) hold at a small shape."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ctc_runs_and_every_implementation_matches_the_builtin(capsys):
    spec = importlib.util.spec_from_file_location("bench_ctc", ROOT / "scripts" / "bench_ctc.py")
    bench_ctc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ctc)
    bench_ctc.main(["--device", "cpu", "--frames", "24", "--batch", "4", "--classes", "6", "--target-length", "5",
                    "--repeats", "1"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("built-in", "autograd", "alpha-beta")}
    assert set(rows) == {"built-in", "autograd", "alpha-beta"}
    for name, cells in rows.items():
        assert cells[5:8] == ["True", "True", "True"], (name, cells)  # loss, grad, CE-grad match

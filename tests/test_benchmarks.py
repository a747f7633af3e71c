"""The CTC benchmark script runs and its correctness columns (against the float64 built-in) hold at a small shape."""

from conftest import load_script


def test_bench_ctc_runs_and_every_implementation_matches_the_builtin(capsys):
    load_script("bench_ctc").main(["--device", "cpu", "--frames", "24", "--batch", "4", "--classes", "6", "--target-length", "5",
                    "--repeats", "1"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("built-in", "autograd", "alpha-beta")}
    assert set(rows) == {"built-in", "autograd", "alpha-beta"}
    for name, cells in rows.items():
        assert cells[5:8] == ["True", "True", "True"], (name, cells)  # loss, grad, CE-grad match


def test_bench_ctc_all_losses_reports_time_and_peak_memory_of_every_loss(capsys):
    load_script("bench_ctc").main(["--device", "cpu", "--losses", "all", "--frames", "12", "--batch", "2",
                                   "--classes", "3000", "--target-length", "4", "--repeats", "1"])
    names = ("ctc", "python_ctc", "python_ctc_autograd", "focal_ctc", "reweighted_ctc", "smoothed_ctc", "maxent_ctc")
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in names}
    assert set(rows) == set(names)
    for name, cells in rows.items():
        assert cells[4].endswith("x") and float(cells[5]) >= 0.0, (name, cells)  # time ratio, peak MiB added

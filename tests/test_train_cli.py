import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from bdlkit import cli, plots
from bdlkit.train import evaluate, fit, load_checkpoint, predict_proba, seed_everything


def _toy_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]


def _train_once(seed, epochs=3, checkpoint=None):
    seed_everything(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    hist = fit(net, _toy_data(), epochs, opt, sched, quiet=True, checkpoint=checkpoint)
    return net, hist


def test_fit_learns_and_is_deterministic():
    net1, h1 = _train_once(3)
    net2, h2 = _train_once(3)
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(net1.parameters(), net2.parameters(), strict=True))
    assert evaluate(net1, _toy_data(1))["accuracy"] > 0.9
    assert h1["loss"][-1] < h1["loss"][0]


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    full, _ = _train_once(0, epochs=4)
    ck = tmp_path / "ck.pt"
    _train_once(0, epochs=2, checkpoint=ck)
    assert load_checkpoint(ck, nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))) == 2
    # Resuming consumes no fresh randomness here (no shuffling), so the result is identical.
    resumed, hist = _train_once(0, epochs=4, checkpoint=ck)
    assert len(hist["loss"]) == 2
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_fit_validation():
    net = nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs"):
        fit(net, [], -1, opt)
    with pytest.raises(ValueError, match="scheduler_step"):
        fit(net, [], 1, opt, scheduler_step="sometimes")
    with pytest.raises(TypeError, match="input, target"):
        fit(net, [torch.randn(2, 2)], 1, opt, quiet=True)
    with pytest.raises(ValueError, match="no batches"):
        predict_proba(net, [])


def test_cli_unknown_method_exit_code_2(capsys):
    assert cli.main(["run", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nonsense'" in err and "baseline" in err and len(err.splitlines()) == 1


def test_cli_rejects_bad_threads(capsys):
    assert cli.main(["run", "baseline", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_cli_records_environment_and_restores_threads(tmp_path, monkeypatch):
    seen = {}

    def fake_recipe(name, out, quick, seed):  # stands in for a recipe's training
        seen["threads"] = torch.get_num_threads()
        return {"title": name, "tables": []}

    monkeypatch.setattr(cli, "run_recipe", fake_recipe)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    assert cli.main(["run", "baseline", "--quick", "--out", str(tmp_path),
                     "--threads", str(want)]) == 0
    assert seen["threads"] == want and torch.get_num_threads() == before
    env = json.loads((tmp_path / "baseline" / "result.json").read_text())["environment"]
    assert env["threads"] == want and env["torch"] == torch.__version__
    assert set(env) >= {"bdlkit", "python", "malloc_tuned", "started_utc"}
    assert f"{want} thread(s)" in (tmp_path / "report.md").read_text()


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "bdlkit", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "run" in out and "report" in out


def test_report_renders_tables_and_figures(tmp_path):
    (tmp_path / "baseline").mkdir()
    probs = torch.softmax(torch.randn(50, 10), 1)
    labels = torch.randint(0, 10, (50,))
    png = plots.reliability_diagram({"m": (probs, labels)}, tmp_path / "baseline" / "rel.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = {"title": "Baseline", "tables": [{"title": "T", "columns": ["a", "b"],
                                               "rows": [["x", 0.123456]]}],
              "figures": [{"path": "rel.png", "caption": "cap"}], "wall_time_s": 3.0,
              "config": {"quick": True}}
    (tmp_path / "baseline" / "result.json").write_text(json.dumps(result))
    assert cli.main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| x | 0.1235 |" in text and "(baseline/rel.png)" in text and "quick mode" in text


def test_plots_validate_inputs(tmp_path):
    with pytest.raises(ValueError, match=".png"):
        plots.line_plot({"a": ([0], [1])}, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="differ"):
        plots.line_plot({"a": ([0, 1], [1])}, tmp_path / "x.png")
    assert plots.sample_grid(torch.rand(5, 1, 8, 8), tmp_path / "g.png", nrow=2).is_file()
    assert plots.scatter_2d({"a": torch.randn(10, 2), "b": torch.randn(10, 2)},
                            tmp_path / "s.png").is_file()


@pytest.mark.slow
def test_baseline_recipe_quick_end_to_end(tmp_path):
    assert cli.main(["run", "baseline", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "baseline" / "result.json").read_text())
    assert result["headline"]["lenet5_mnist_test_acc"] >= 0.98
    assert (tmp_path / "baseline" / "reliability.png").is_file()
    assert (tmp_path / "report.md").is_file()

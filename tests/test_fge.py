"""Tests for FGE: cyclic schedule, snapshots, ensembles, Lightning callback."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdlkit.ensemble import Ensemble, FGESchedule, collect_fge, fge_lr

torch.set_num_threads(1)


def _formula(i: int, c: int, a1: float, a2: float, n: int) -> float:
    t = ((i // n) % c + (i % n) / n) / c
    return (1 - 2 * t) * a1 + 2 * t * a2 if t < 0.5 else (2 - 2 * t) * a2 + (2 * t - 1) * a1


def test_lr_at_quarter_points_matches_formula():
    c, n, a1, a2 = 4, 10, 0.05, 1e-4
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = FGESchedule(opt, cycle=c, lr_1=a1, lr_2=a2, steps_per_epoch=n)
    lrs = []
    for _ in range(2 * c * n + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per = c * n
    for k, expect in [(0, a1), (per // 4, (a1 + a2) / 2), (per // 2, a2),
                      (3 * per // 4, (a1 + a2) / 2), (per, a1)]:
        assert lrs[k] == pytest.approx(expect, rel=1e-12)
        assert lrs[k + per] == pytest.approx(expect, rel=1e-12)  # periodic
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(_formula(i, c, a1, a2, n), rel=1e-12)
    assert min(lrs) == pytest.approx(a2) and max(lrs) == pytest.approx(a1)


def test_should_snapshot_at_mid_cycle_only():
    c, n = 2, 3
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = FGESchedule(opt, cycle=c, lr_1=0.1, lr_2=0.001, steps_per_epoch=n)
    flags = []
    for _ in range(3 * c * n):
        opt.step()
        sched.step()
        flags.append(sched.should_snapshot)
        if sched.should_snapshot:
            assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert [i + 1 for i, f in enumerate(flags) if f] == [3, 9, 15]
    assert sched.snapshots_so_far == 3


def test_schedule_all_groups_and_state_dict_roundtrip():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[1].parameters(),
                                                            "lr": 9.0}], lr=1.0)
    sched = FGESchedule(opt, 2, 0.05, 1e-4, 5)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == pytest.approx(
        fge_lr(3, 2, 0.05, 1e-4, 5))
    opt2 = torch.optim.SGD(net.parameters(), lr=1.0)
    sched2 = FGESchedule(opt2, 2, 0.05, 1e-4, 5)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 3 and sched2.get_lr()[0] == pytest.approx(sched.get_lr()[0])


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [({"cycle": 3}, ValueError, "cycle"), ({"cycle": 0}, ValueError, "cycle"),
     ({"cycle": 2.0}, TypeError, "cycle"), ({"lr_1": -1.0}, ValueError, "lr_1"),
     ({"lr_2": 0.0}, ValueError, "lr_2"), ({"steps_per_epoch": 0}, ValueError, "steps_per_epoch")],
)
def test_schedule_bad_input(kwargs, exc, word):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.3)
    args = {"cycle": 4, "lr_1": 0.05, "lr_2": 1e-4, "steps_per_epoch": 10, **kwargs}
    with pytest.raises(exc, match=word):
        FGESchedule(opt, **args)
    assert opt.param_groups[0]["lr"] == 0.3  # optimizer untouched
    with pytest.raises(TypeError, match="optimizer"):
        FGESchedule(object(), 4)  # type: ignore[arg-type]


def test_ensemble_is_mean_of_softmaxes():
    torch.manual_seed(0)
    members = [nn.Linear(4, 3) for _ in range(3)]
    ens = Ensemble(members)
    x = torch.randn(7, 4)
    expect = sum(F.softmax(m(x), -1) for m in members) / 3
    torch.testing.assert_close(ens(x), expect)
    loader = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.ones(3, dtype=torch.long))]
    probs, labels = ens.predict(loader, return_labels=True)
    torch.testing.assert_close(probs, expect.detach())
    assert labels.tolist() == [0] * 4 + [1] * 3
    with pytest.raises(ValueError, match="no members"):
        Ensemble().predict(loader)
    with pytest.raises(TypeError, match="models"):
        Ensemble([nn.Linear(2, 2), "x"])  # type: ignore[list-item]


def test_ensemble_predict_uncertainty_splits_the_entropy():
    torch.manual_seed(0)
    members = [nn.Linear(4, 3) for _ in range(3)]
    ens = Ensemble(members)
    x = torch.randn(7, 4)
    loader = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.ones(3, dtype=torch.long))]
    u = ens.predict_uncertainty(loader)
    each = torch.stack([F.softmax(m(x), -1) for m in members]).detach()
    mean = each.mean(0)
    torch.testing.assert_close(u["probs"], ens.predict(loader))
    torch.testing.assert_close(u["total"], -(mean * mean.log()).sum(-1))
    torch.testing.assert_close(u["aleatoric"], -(each * each.log()).sum(-1).mean(0))
    torch.testing.assert_close(u["epistemic"], u["total"] - u["aleatoric"])
    assert bool((u["epistemic"] > 0).all())  # different members disagree
    same = Ensemble([members[0], members[0]]).predict_uncertainty(loader)
    assert float(same["epistemic"].max()) < 1e-6  # identical members: no epistemic part
    with pytest.raises(ValueError, match="no members"):
        Ensemble().predict_uncertainty(loader)
    with pytest.raises(ValueError, match="no batches"):
        ens.predict_uncertainty([])


def test_ensemble_predict_refreshes_bn_and_restores_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net.train()
    ens = Ensemble([net])
    data = [torch.randn(16, 3) * 2 + 5 for _ in range(4)]
    ens.predict(data, bn_loader=data)
    allx = torch.cat(data)
    torch.testing.assert_close(net[1].running_mean, net[0](allx).mean(0).detach(),
                               rtol=1e-4, atol=1e-4)
    assert net.training  # mode restored


def _toy_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    y = (x @ w).argmax(-1)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)], x, y


def test_collect_fge_snapshots_match_manual_schedule():
    torch.manual_seed(0)
    loader, _, _ = _toy_problem()
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    before = copy.deepcopy(net.state_dict())
    ens = collect_fge(net, loader, num_snapshots=2, cycle=2, lr_1=0.1, lr_2=1e-3,
                      weight_decay=0.0)
    assert len(ens) == 2
    for k, v in net.state_dict().items():  # not inplace: the input is untouched
        assert torch.equal(v, before[k])
    # Replay by hand: 1 epoch to the first snapshot, 2 more to the second.
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    sched = FGESchedule(opt, 2, 0.1, 1e-3, len(loader))
    snaps = []
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
            sched.step()
            if sched.should_snapshot:
                snaps.append(copy.deepcopy(ref))
    for a, b in zip(ens.members, snaps, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # The snapshots differ from each other (they move between cycles).
    assert not torch.equal(ens.members[0][0].weight, ens.members[1][0].weight)


def test_collect_fge_bad_input_and_include_start():
    loader, _, _ = _toy_problem()
    net = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="cycle"):
        collect_fge(net, loader, num_snapshots=2, cycle=3)
    with pytest.raises(ValueError, match="num_snapshots"):
        collect_fge(net, loader, num_snapshots=0)
    ens = collect_fge(net, loader, num_snapshots=1, cycle=2, include_start=True)
    assert len(ens) == 2 and torch.equal(ens.members[0].weight, net.weight)


def test_collect_fge_bn_refresh_of_snapshots():
    torch.manual_seed(0)
    loader, x, _ = _toy_problem()
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    bn_data = [x[:128] * 3 + 1]
    ens = collect_fge(net, loader, num_snapshots=2, cycle=2, bn_loader=bn_data)
    for snap in ens.members:
        assert not snap.training
        h = snap[0](bn_data[0])
        torch.testing.assert_close(snap[1].running_mean, h.mean(0).detach(), rtol=1e-4,
                                   atol=1e-5)

def test_fge_ensemble_beats_start_on_nll():
    """FGE from an under-trained model: ensemble NLL below the starting model's."""
    torch.manual_seed(1)
    loader, x, y = _toy_problem(1)
    net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 3))
    ens = collect_fge(net, loader, num_snapshots=3, cycle=2, lr_1=0.05, lr_2=1e-3)
    with torch.no_grad():
        nll_start = F.cross_entropy(net(x), y).item()
        nll_ens = F.nll_loss(ens(x).log(), y).item()
    assert nll_ens < nll_start


def test_recipe_fge_plan_fits_budget():
    from bdlkit.experiments.fge import fge_plan

    assert fge_plan(10, 8, 2.0) == (3, 13.0)  # snapshots at 9, 11, 13 passes
    assert fge_plan(10, 8, 1.0) == (5, 12.5)
    assert fge_plan(10, 7, 2.0) == (3, 12.0)
    for epochs, branch, cyc in [(10, 8, 2.0), (5, 4, 1.0), (10, 6, 0.5), (7, 5, 2.0)]:
        k, passes = fge_plan(epochs, branch, cyc)
        assert passes <= 1.3 * epochs + 1e-9 < passes + cyc
    with pytest.raises(ValueError, match="no snapshot"):
        fge_plan(10, 10, 8.0)
    with pytest.raises(ValueError, match="branch"):
        fge_plan(10, 11, 1.0)


lightning = pytest.importorskip("lightning.pytorch")


class _LitNet(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.lrs: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def test_lightning_callback_schedule_and_snapshots(tmp_path):
    from bdlkit.integrations._fge_callback import FGECallback

    torch.manual_seed(0)
    _, x, y = _toy_problem()
    ds = torch.utils.data.TensorDataset(x, y)
    dl = torch.utils.data.DataLoader(ds, batch_size=32)  # 8 steps per epoch
    cb = FGECallback(cycle=2, lr_1=0.05, lr_2=1e-3, start_epoch=1, attr="net")
    module = _LitNet()
    trainer = lightning.Trainer(max_epochs=5, callbacks=[cb], accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dl)
    assert module.lrs[:8] == [0.5] * 8  # before start_epoch the module's own lr
    for i, lr in enumerate(module.lrs[8:]):
        assert lr == pytest.approx(fge_lr(i, 2, 0.05, 1e-3, 8))
    # FGE epochs 1..4 = 2 cycles -> snapshots after FGE steps 8 and 24.
    assert len(cb.snapshots) == 2
    assert all(isinstance(s, nn.Sequential) for s in cb.snapshots)
    probs = cb.ensemble().predict([(x, y)])
    assert probs.shape == (256, 3)
    state = cb.state_dict()
    cb2 = FGECallback(cycle=2, lr_1=0.05, lr_2=1e-3, start_epoch=1, attr="net")
    cb2.load_state_dict(state)
    cb2.on_train_start(trainer, module)
    for a, b in zip(cb.snapshots, cb2.snapshots, strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(),
                                      strict=True):
            assert ka == kb and torch.equal(va, vb)



def test_submodule_modes_survive_predict_and_inplace_fge():
    torch.manual_seed(0)
    loader, x, _ = _toy_problem()
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    net[1].eval()  # a BatchNorm frozen while the rest fine-tunes
    Ensemble([net]).predict([x])
    assert net.training and not net[1].training
    collect_fge(net, loader, num_snapshots=1, cycle=2, inplace=True)
    assert net.training and not net[1].training


def test_collect_fge_loses_no_batch_of_an_iterator():
    loader, _, _ = _toy_problem()
    seen = []

    def stream():
        for i in range(100):
            seen.append(i)
            yield loader[i % len(loader)]

    it = stream()
    collect_fge(nn.Linear(5, 3), it, num_snapshots=2, cycle=2, steps_per_epoch=3)
    # Cycles of 2 epochs of 3 steps: snapshots after steps 3 and 9, so exactly 9 batches are
    # drawn; none is fetched at an epoch boundary and dropped.
    assert seen == list(range(9))


def test_lightning_callback_counts_partial_accumulation_windows():
    from types import SimpleNamespace

    from bdlkit.integrations._fge_callback import FGECallback

    trainer = SimpleNamespace(num_training_batches=10, accumulate_grad_batches=3)
    assert FGECallback._steps_per_epoch(trainer) == 4  # steps after batches 3, 6, 9 and 10


def test_lightning_callback_snapshot_keeps_the_live_model_modes():
    from types import SimpleNamespace

    from bdlkit.integrations._fge_callback import FGECallback

    module = _LitNet()
    module.net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    module.train()
    module.net[1].eval()
    cb = FGECallback(cycle=2, lr_1=0.05, lr_2=1e-3, attr="net")
    trainer = SimpleNamespace(current_epoch=0, global_step=0, num_training_batches=2,
                              accumulate_grad_batches=1, optimizers=[])
    cb.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 2  # mid-cycle of a 2-epoch cycle of 2 steps per epoch
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert len(cb.snapshots) == 1 and not cb.snapshots[0].training
    assert module.net.training and not module.net[1].training


def test_ensemble_of_float32_and_float64_members():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2).double()
    x = torch.randn(4, 3)
    expected = (F.softmax(a(x), -1) + F.softmax(b(x.double()), -1).float()) / 2
    ens = Ensemble([a, b])
    torch.testing.assert_close(ens.predict([x]), expected.detach())
    assert ens.predict_uncertainty([x])["probs"].shape == (4, 2)

"""SWAGCallback under Lightning: collection, checkpoint/resume, DDP (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lightning")
import lightning as L  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bdlkit.integrations._swag_callback import SWAGCallback  # noqa: E402
from bdlkit.posterior.swag import SWAG  # noqa: E402
from bdlkit.weights import flatten_params  # noqa: E402

torch.set_num_threads(1)


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(max_epochs: int, callbacks, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", devices=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights.append(flatten_params(pl_module).clone())


def test_callback_collects_after_swa_start_like_manual_swag():
    model = _Net()
    cb, rec = SWAGCallback(swa_start=2, max_rank=3), _Recorder()
    _trainer(6, [cb, rec]).fit(model, _loader())
    assert cb.swag is not None and cb.swag.n_collected == 4
    manual = SWAG(_Net(), max_rank=3)
    for w in rec.weights[2:]:
        holder = _Net()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(w, holder.parameters())
        manual.collect(holder)
    a, b = cb.swag.state_dict(), manual.state_dict()
    for key in ("mean", "sq_mean", "deviations"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # the SWAG posterior predicts through a copy of the LightningModule
    probs = cb.swag.predict(_loader(), n_samples=2, bn_loader=_loader(), seed=0)
    assert probs.shape == (64, 3)
    with pytest.raises(ValueError, match="swa_start"):
        SWAGCallback(swa_start=-1)


class _LazyNet(_Net):
    """Creates its layers in ``configure_model``, which Lightning calls after ``setup``."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_callback_sees_layers_created_in_configure_model():
    cb = SWAGCallback(swa_start=0, max_rank=2)
    module = _LazyNet()
    _trainer(2, [cb]).fit(module, _loader())
    assert cb.swag.n_collected == 2
    assert cb.swag.num_params == 4 * 8 + 8 + 8 * 3 + 3  # the layers made in configure_model
    assert torch.equal(flatten_params(cb.swag.sample(scale=0.0)), cb.swag.mean)


def test_callback_state_survives_checkpoint_resume(tmp_path):
    full = SWAGCallback(swa_start=1, max_rank=4)
    _trainer(5, [full]).fit(_Net(), _loader())

    first = SWAGCallback(swa_start=1, max_rank=4)
    trainer = _trainer(3, [first])
    trainer.fit(_Net(), _loader())
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.swag.n_collected == 2

    resumed = SWAGCallback(swa_start=1, max_rank=4)
    _trainer(5, [resumed]).fit(_Net(), _loader(), ckpt_path=str(ckpt))
    assert resumed.swag.n_collected == full.swag.n_collected == 4
    a, b = resumed.swag.state_dict(), full.swag.state_dict()
    for key in ("mean", "sq_mean", "deviations"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert a["next_row"] == b["next_row"]
    # the checkpoint itself loads with weights_only=True
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert any("SWAGCallback" in k for k in state["callbacks"])


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from bdlkit.batchnorm import refresh_bn
    from bdlkit.integrations._swag_callback import SWAGCallback

    torch.set_num_threads(1)
    out = sys.argv[1]

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                     nn.Linear(8, 3))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    cb = SWAGCallback(swa_start=1, max_rank=3)
    trainer = L.Trainer(max_epochs=4, callbacks=[cb], accelerator="cpu", devices=2,
                        strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
    rank = trainer.global_rank
    model = cb.swag.sample(scale=0.5, seed=3)
    # each rank refreshes BN on its own shard; refresh_bn all-reduces the statistics
    shard = [x[rank::2][8 * b: 8 * b + 8] for b in range(4)]
    assert dist.is_initialized() and dist.get_world_size() == 2
    refresh_bn(model, shard)
    bn = model.net[1]
    torch.save({"swag": cb.swag.state_dict(),
                "sample": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                "n_collected": cb.swag.n_collected}, f"{out}/rank{rank}.pt")
    """
)


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    script = tmp_path / "ddp_swag.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PL_DISABLE_FORK="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["n_collected"] == r1["n_collected"] == 3
    for key in ("mean", "sq_mean", "deviations"):
        torch.testing.assert_close(r0["swag"][key], r1["swag"][key], rtol=0, atol=0)
    torch.testing.assert_close(r0["sample"], r1["sample"], rtol=0, atol=0)
    torch.testing.assert_close(r0["running_mean"], r1["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(r0["running_var"], r1["running_var"], rtol=0, atol=0)

    # brute force: refresh each shard in this (non-distributed) process and pool by hand
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    from bdlkit.batchnorm import refresh_bn
    from bdlkit.weights import assign_params

    stats = []
    for rank in (0, 1):
        assign_params(net, r0["sample"])
        refresh_bn(net, [x[rank::2][8 * b: 8 * b + 8] for b in range(4)])
        stats.append((net[1].running_mean.clone(), net[1].running_var.clone()))
    mean = (stats[0][0] + stats[1][0]) / 2
    var = (stats[0][1] + stats[1][1]) / 2
    torch.testing.assert_close(r0["running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["running_var"], var, rtol=1e-5, atol=1e-6)
    # the pooled statistics equal a single-process refresh over all eight batches
    assign_params(net, r0["sample"])
    refresh_bn(net, [x[r::2][8 * b: 8 * b + 8] for r in (0, 1) for b in range(4)])
    torch.testing.assert_close(r0["running_mean"], net[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["running_var"], net[1].running_var, rtol=1e-5, atol=1e-6)


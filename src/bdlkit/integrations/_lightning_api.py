"""The Lightning names the callbacks use, imported once with a clear error without the extra."""

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "bdlkit.integrations.lightning needs the optional 'lightning' extra: "
        "pip install 'bdlkit[lightning]'"
    ) from exc

__all__ = ["Callback", "LightningModule", "Trainer"]

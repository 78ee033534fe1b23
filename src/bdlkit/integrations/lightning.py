"""Lightning callbacks (optional extra: ``pip install bdlkit[lightning]``).

Example:
    >>> from bdlkit.integrations.lightning import SWAGCallback, FGECallback  # doctest: +SKIP
"""

from ._fge_callback import FGECallback
from ._swag_callback import SWAGCallback

__all__ = ["SWAGCallback", "FGECallback"]

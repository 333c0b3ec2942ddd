"""Optional dependencies of the exports, imported on use with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingExtraError

__all__ = ["require"]

#: extra name -> what it installs (kept in step with pyproject.toml's [project.optional-dependencies])
EXTRAS = {"nwb": "pynwb, hdmf and nwbinspector", "interop": "spikeinterface, pandas and phylib"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'spikearray[extra]'``.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"pynwb"``.
    extra : str
        The spikearray extra that installs it (``"nwb"`` or ``"interop"``).
    what : str
        The feature that needs it, for the message (e.g. ``"export_nwb"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs {module!r}, which is not installed ({e}). Install the optional dependencies with: "
            f"pip install 'spikearray[{extra}]' (it adds {EXTRAS.get(extra, module)})."
        ) from None

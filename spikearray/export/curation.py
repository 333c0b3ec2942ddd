"""Select units of a Sorting Dataset together with their spikes (``select_units``, ``drop_noise``).

``sorting.sel(unit=mask)`` selects along the ``unit`` dimension only: per-spike variables (``spike_time``,
``spike_unit``, ...) live on the ``spike`` dimension and would keep the spikes of the units left out, and
``similarity`` would keep its second unit axis (``unit_b``) whole. :func:`select_units` applies the same selection
to all three dimensions, so the result is again a consistent Sorting Dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..errors import DataError

__all__ = ["select_units", "drop_noise"]


def _unit_ids(sorting: xr.Dataset, units: Any) -> np.ndarray:
    ids = np.asarray(sorting["unit"].values)
    if isinstance(units, xr.DataArray):
        if units.dtype == bool:
            if units.dims != ("unit",):
                raise DataError(f"a boolean unit mask must have dims ('unit',), got {units.dims}; build it from a "
                                "per-unit variable, e.g. sorting.label != 'noise'.")
            units = units.reindex(unit=ids).values
        else:
            units = units.values
    units = np.asarray(units)
    if units.dtype == bool:
        if units.shape != ids.shape:
            raise DataError(f"the unit mask has {units.size} values but the sorting has {ids.size} units.")
        return ids[units]
    units = units.ravel()
    missing = np.setdiff1d(units, ids)
    if missing.size:
        raise DataError(f"unit ids {missing[:10].tolist()} are not in the sorting (its units: "
                        f"{ids[:20].tolist()}{' ...' if ids.size > 20 else ''}).")
    return units


def select_units(sorting: xr.Dataset, units: Any) -> xr.Dataset:
    """The Sorting Dataset restricted to some units: their per-unit rows, their spikes and their similarities.

    Parameters
    ----------
    sorting : xarray.Dataset
        A Sorting Dataset (``spike_unit`` per spike, ``unit`` coordinate).
    units : array-like of unit ids, or boolean mask over ``unit``
        Ids to keep (in the order given), or a boolean mask such as ``sorting.label != "noise"``.

    Returns
    -------
    xarray.Dataset
        ``unit`` (and ``unit_b``) restricted to the selected ids; ``spike`` restricted to their spikes, in the
        original (time) order. Attrs are kept; ``n_units_good`` is updated.

    Raises
    ------
    DataError
        An id that is not a unit of the sorting, or a mask of the wrong length.

    Examples
    --------
    >>> import spikearray as sa
    >>> curated = sa.read_phy("DIR/phy")  # doctest: +SKIP
    >>> kept = sa.select_units(curated, curated.label != "noise")  # doctest: +SKIP
    >>> set(kept.spike_unit.values) <= set(kept.unit.values)  # doctest: +SKIP
    True
    """
    keep = _unit_ids(sorting, units)
    out = sorting.sel(unit=keep)
    if "spike_unit" in sorting and "spike" in sorting.dims:
        mask = np.isin(np.asarray(sorting["spike_unit"].values), keep)
        out = out.isel(spike=np.flatnonzero(mask))
    if "unit_b" in sorting.dims:
        pos = {int(u): i for i, u in enumerate(np.asarray(sorting["unit"].values))}
        out = out.isel(unit_b=[pos[int(u)] for u in keep])
    if "label" in out and "n_units_good" in out.attrs:
        out.attrs = {**out.attrs, "n_units_good": int((np.asarray(out["label"].values).astype(str) == "good").sum())}
    return out


def drop_noise(sorting: xr.Dataset, labels: tuple[str, ...] = ("noise",)) -> xr.Dataset:
    """The sorting without the units Phy curation labelled ``noise`` (and without their spikes).

    Parameters
    ----------
    sorting : xarray.Dataset
        A Sorting Dataset with a per-unit ``label`` (``good`` / ``mua`` / ``noise`` / ``unsorted``).
    labels : tuple of str
        Labels to drop.

    Returns
    -------
    xarray.Dataset
        ``select_units(sorting, ~sorting.label.isin(labels))``.

    Examples
    --------
    >>> import spikearray as sa
    >>> clean = sa.drop_noise(sa.read_phy("DIR/phy"))  # doctest: +SKIP
    """
    if "label" not in sorting:
        raise DataError("the sorting has no 'label' variable; it is not a Sorting Dataset.")
    lab = np.asarray(sorting["label"].values).astype(str)
    return select_units(sorting, ~np.isin(lab, list(labels)))

"""One typed settings object for the whole pipeline.

The table :data:`PARAMETERS` is the single source of truth: name, type, default, bounds, unit, owning stage
and description of every parameter. It drives validation, JSON round trips, ``docs/settings.md`` and the
command line's ``--help``. Names are Kilosort4's (4.1.x ``DEFAULT_SETTINGS`` plus the ``run_kilosort``
switches ``do_CAR`` and ``invert_sign``) so a Kilosort4 settings dict can be passed as it is; spikearray's own
parameters follow. Defaults are Kilosort4's except three that measured better on the ground-truth sets
(:data:`KILOSORT4_DEFAULTS` lists Kilosort4's values; :meth:`Settings.kilosort4` applies them).
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError

__all__ = ["Param", "PARAMETERS", "Settings", "KILOSORT4_DEFAULTS", "IgnoredSettingWarning", "IGNORED"]

_NUM = (int, float)


class IgnoredSettingWarning(UserWarning):
    """A Kilosort4 setting that spikearray accepts for compatibility but does not use was given a non-default
    value (see :data:`IGNORED` and ``docs/settings.md``)."""


@dataclass(frozen=True)
class Param:
    """Description of one setting.

    Attributes
    ----------
    name : str
        Kilosort4's name where it has one.
    default : object
        Default value (``None`` means "derived from the data", as in Kilosort4).
    types : tuple of type
        Accepted Python types (``None`` is also accepted when the default is ``None``).
    stage : str
        The stage that reads it.
    unit : str
        Physical unit, or ``"-"``.
    doc : str
        One-line description.
    low, high : float or None
        Inclusive bounds for numbers.
    ignored : bool
        Accepted so that a Kilosort4 settings dict works as it is, but no stage reads it (``doc`` says why and
        what to do instead). Setting it to a non-default value warns (:class:`IgnoredSettingWarning`), and it is
        left out of every stage-cache hash, so changing it never invalidates a cached stage.
    """

    name: str
    default: Any
    types: tuple
    stage: str
    unit: str
    doc: str
    low: float | None = None
    high: float | None = None
    ignored: bool = False


PARAMETERS: tuple[Param, ...] = (
    # --- recording (Kilosort4 names, accepted for compatibility) ---
    Param("n_chan_bin", None, (int,), "recording", "channels",
          "columns in the raw binary incl. sync; spikearray reads it from the .meta, and checks it when given", 1),
    Param("fs", 30000.0, _NUM, "recording", "Hz",
          "sampling rate; the recording's own rate is used: a non-default fs that differs from it by more than "
          "0.1 % is an error (RecordingError), so a Kilosort4 dict written for another rate cannot pass silently", 1),
    Param("tmin", 0.0, _NUM, "recording", "s", "start of the sorted time range", 0),
    Param("tmax", math.inf, _NUM, "recording", "s", "end of the sorted time range", 0),
    Param("shift", None, _NUM, "recording", "file units",
          "if set, samples = samples*scale + shift in the file's own units (before the µV gain), before anything "
          "else; the high-pass removes a constant offset again (as in Kilosort4), so of the two only scale can "
          "change the sorting"),
    Param("scale", None, _NUM, "recording", "-",
          "if set, samples = samples*scale (+ shift) before anything else, e.g. to bring float data in volts to "
          "the ~±100 range; the µV gain is applied after it"),
    Param("data_dir", None, (str,), "recording", "-",
          "ignored (Kilosort4 compatibility): pass the paths to open_recording", ignored=True),
    Param("filename", None, (str,), "recording", "-",
          "ignored (Kilosort4 compatibility): pass the paths to open_recording", ignored=True),
    Param("results_dir", None, (str,), "recording", "-",
          "ignored (Kilosort4 compatibility): use sort(output=...)", ignored=True),
    Param("probe_name", None, (str,), "recording", "-",
          "ignored (Kilosort4 compatibility): use open_recording(probe=...)", ignored=True),
    Param("probe_path", None, (str,), "recording", "-",
          "ignored (Kilosort4 compatibility): use open_recording(probe=...)", ignored=True),
    # --- preprocessing ---
    Param("batch_size", 60000, (int,), "preprocessing", "samples", "batch length NT (2 s at 30 kHz)", 61),
    Param("batch_downsampling", 1, (int,), "preprocessing", "batches",
          "the global estimates (whitening covariance and bad-channel noise windows, waveform-basis learning) use "
          "only every k-th batch_size window; filtering, detection and matching still see every sample", 1),
    Param("do_CAR", True, (bool,), "preprocessing", "-", "subtract the median across channels at every sample"),
    Param("invert_sign", False, (bool,), "preprocessing", "-", "multiply the data by -1 (applied consistently)"),
    Param("highpass_cutoff", 300.0, _NUM, "preprocessing", "Hz", "Butterworth high-pass cutoff", 1),
    Param("artifact_threshold", math.inf, _NUM, "preprocessing", "µV",
          "zero every batch (the fixed window [b*batch_size, (b+1)*batch_size), whatever the chunking) whose "
          "filtered, referenced data reach this absolute value; such batches are also left out of the whitening "
          "and bad-channel estimates", 0),
    Param("nskip", 25, (int,), "preprocessing", "batches", "stride between batches used for the whitening covariance", 1),
    Param("whitening_range", 32, (int,), "preprocessing", "channels", "neighbourhood size of the local ZCA whitening", 1),
    # --- drift ---
    Param("nblocks", 5, (int,), "drift", "-",
          "drift blocks: 0 off, 1 rigid, n>1 gives 2n-1 overlapping blocks (Kilosort4: 1; 5 measured better on "
          "non-rigid drift, GT-B 0.70 vs 1.50 µm, and costs nothing on static data)", 0),
    Param("binning_depth", 5.0, _NUM, "drift", "µm", "depth bin of the drift fingerprints", 0.1),
    Param("sig_interp", 20.0, _NUM, "drift", "µm", "Gaussian kernel width of the drift interpolation", 0.1),
    Param("drift_smoothing", (0.5, 0.5, 0.5), (list, tuple), "drift", "(shift, batch, block)",
          "Gaussian sigma applied to the block-correlation array"),
    Param("drift_threshold", 5.0, _NUM, "drift", "whitened SD",
          "threshold on negative peaks of the whitened data for the spikes that drift estimation uses", 0),
    # --- detection ---
    Param("Th_universal", 6.0, _NUM, "detection", "whitened SD",
          "threshold of the space-time matched filter that detects spikes for clustering (Kilosort4: 9 for its "
          "universal templates; 6 recovers units down to ~40 µV with no false-positive units on GT-A/GT-B)", 0),
    Param("Th_learned", 6.0, _NUM, "matching", "whitened SD",
          "matching-pursuit threshold, compared as Th² with the variance a template explains (Kilosort4: 8; 6 "
          "keeps the 40–50 µV units' recall above 0.95 at unchanged precision on our ground truth)", 0),
    Param("Th_bounded", 4.5, _NUM, "matching", "whitened SD",
          "matching threshold for a spike whose amplitude scale is 0.7-1.4 times its template's (a spike of the "
          "unit's own size); values >= Th_learned turn it off (Kilosort4 has no such rule). 4.5 took the 20-30 uV "
          "units of the dense paper set from 4 to 8 well detected and false-positive units from 8 to 4; GT-A and "
          "GT-B 32 -> 33 of 35", 0),
    Param("nt", 61, (int,), "detection", "samples", "waveform length; must be odd", 11, 301),
    Param("nt0min", None, (int,), "detection", "samples", "trough index within a waveform (default int(20*nt/61))", 0),
    Param("dmin", None, _NUM, "detection", "µm", "vertical spacing of template positions is dmin/2 (default: median pitch)", 0.1),
    Param("dminx", 32.0, _NUM, "detection", "µm",
          "ignored: spikearray's detector centres its spatial templates on the channels, not on a dminx/2 grid",
          0.1, ignored=True),
    Param("min_template_size", 10.0, _NUM, "detection", "µm", "sigma of the smallest spatial envelope", 0.1),
    Param("template_sizes", 5, (int,), "detection", "-", "number of envelope sizes", 1),
    Param("nearest_chans", 10, (int,), "detection", "channels", "channels per template / feature neighbourhood", 1),
    Param("nearest_templates", 100, (int,), "detection", "positions",
          "ignored: the detector's local-maximum test spans the channels within 100 µm (no grid of positions)",
          1, ignored=True),
    Param("max_channel_distance", 32.0, _NUM, "detection", "µm",
          "ignored: there is no template grid to prune, every spatial template sits on a channel", 0, ignored=True),
    Param("templates_from_data", True, (bool,), "detection", "-",
          "ignored: the waveform bases are always learned from the data (spikearray ships no built-in set)",
          ignored=True),
    Param("n_templates", 6, (int,), "detection", "-", "number of single-channel waveform prototypes", 1),
    Param("n_pcs", 6, (int,), "detection", "-", "number of temporal principal components", 1),
    Param("Th_single_ch", 6.0, _NUM, "detection", "whitened SD", "single-channel threshold for waveform snippets", 0),
    # --- matching ---
    Param("max_peels", 100, (int,), "matching", "iterations", "matching-pursuit passes per batch", 1, 10000),
    # --- clustering and merges ---
    Param("acg_threshold", 0.2, _NUM, "metrics", "ratio", "max refractory ratio R12 of a 'good' unit", 0),
    Param("ccg_threshold", 0.25, _NUM, "merging", "ratio", "max cross-refractory ratio R12 for merging", 0),
    Param("cluster_neighbors", 10, (int,), "clustering", "spikes",
          "ignored: spikearray clusters by k-means and bimodality merges, without a kNN graph", 1, ignored=True),
    Param("cluster_downsampling", 20, (int,), "clustering", "-",
          "ignored: there are no landmarks, every spike of a group (up to max_cluster_subset) is clustered",
          1, ignored=True),
    Param("max_cluster_subset", 25000, (int,), "clustering", "spikes",
          "most spikes clustered per spatial group: a larger group is clustered on an evenly spaced subset of "
          "this many spikes and its other spikes join the nearest cluster mean (bounds time and memory on long "
          "recordings)", 100),
    Param("x_centers", None, (int,), "clustering", "count",
          "number of lateral clustering centres (k-means of the contacts' x); None: one per shank, as "
          "Kilosort4's auto rule gives on Neuropixels", 1),
    Param("cluster_init_seed", 5, (int,), "clustering", "-",
          "seed of the clustering's k-means++ initialisation: the clustering seed is (seed + cluster_init_seed "
          "- 5) mod 2^32, so Kilosort4's default 5 leaves spikearray's seed unchanged", 0),
    Param("duplicate_spike_ms", 0.25, _NUM, "metrics", "ms", "same-unit spikes closer than this are removed", 0),
    Param("position_limit", 100.0, _NUM, "metrics", "µm", "max channel distance used in spike positions", 0),
    # --- spikearray's own ---
    Param("device", "auto", (str,), "compute", "-", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'"),
    Param("chunk_seconds", 2.0, _NUM, "compute", "s", "length of the dask chunks along time", 0.01),
    Param("torch_threads", None, (int,), "compute", "threads",
          "torch threads per dask worker thread (default: cores / dask threads, at least 1)", 1),
    Param("seed", 0, (int,), "compute", "-", "seed of every random choice (sampling, initialisations)", 0),
)

_BY_NAME = {p.name: p for p in PARAMETERS}

#: names of the parameters accepted for Kilosort4 compatibility that no stage reads (``Param.ignored``)
IGNORED: frozenset[str] = frozenset(p.name for p in PARAMETERS if p.ignored)


def _warn_ignored(values: dict[str, Any], stacklevel: int = 3) -> None:
    """Warn once per call, naming every ignored parameter whose value in ``values`` differs from its default."""
    named = [k for k, v in values.items() if k in IGNORED and v is not None and _check(_BY_NAME[k], v)
             != _BY_NAME[k].default]
    if named:
        why = "; ".join(f"{k}: {_BY_NAME[k].doc}" for k in named)
        warnings.warn(f"setting(s) {', '.join(repr(k) for k in named)} accepted for Kilosort4 compatibility but "
                      f"not used by spikearray ({why}). Leave them out to silence this warning.",
                      IgnoredSettingWarning, stacklevel=stacklevel)

#: Kilosort4's defaults where spikearray's measured better and differ (see each Param's doc).
KILOSORT4_DEFAULTS = {"nblocks": 1, "Th_universal": 9.0, "Th_learned": 8.0, "Th_bounded": 8.0}


def _check(p: Param, value: Any) -> Any:
    if value is None:
        if p.default is None or p.name in ("torch_threads", "max_cluster_subset"):  # None: derived / unlimited
            return None
        raise SettingsError(f"setting {p.name!r} cannot be None; expected {_typename(p)} (default {p.default!r}).")
    if p.types == _NUM and isinstance(value, bool):
        raise SettingsError(f"setting {p.name!r} got a bool ({value!r}); expected a number in {p.unit}.")
    if isinstance(value, str) and p.types == _NUM:
        try:
            value = float(value)
        except ValueError:
            raise SettingsError(f"setting {p.name!r} got {value!r}; expected a number in {p.unit}.") from None
    if p.types == (int,) and isinstance(value, float) and value.is_integer():
        value = int(value)
    if p.types == (bool,) and not isinstance(value, bool):
        raise SettingsError(f"setting {p.name!r} got {value!r}; expected True or False.")
    if not isinstance(value, p.types) or (p.types == (int,) and isinstance(value, bool)):
        raise SettingsError(
            f"setting {p.name!r} got {value!r} ({type(value).__name__}); expected {_typename(p)}"
            f" (default {p.default!r})."
        )
    if isinstance(value, (list, tuple)):
        value = tuple(float(v) for v in value)
    if isinstance(value, _NUM) and not isinstance(value, bool):
        if (p.low is not None and value < p.low) or (p.high is not None and value > p.high):
            raise SettingsError(
                f"setting {p.name!r} = {value!r} is out of bounds; expected "
                f"{p.low if p.low is not None else '-inf'} <= {p.name} <= {p.high if p.high is not None else 'inf'}"
                f" ({p.unit})."
            )
    if p.name == "nt" and value % 2 == 0:
        raise SettingsError(f"setting 'nt' = {value} must be odd (the waveform is centred on a sample); try {value + 1}.")
    if p.name == "drift_smoothing" and len(value) != 3:
        raise SettingsError(f"setting 'drift_smoothing' needs 3 sigmas (shift, batch, block); got {value!r}.")
    if p.name == "device" and not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:")):
        raise SettingsError(f"setting 'device' = {value!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    return value


def _typename(p: Param) -> str:
    names = {int: "an integer", float: "a number", bool: "True/False", str: "a string", list: "a list", tuple: "a list"}
    if p.types == _NUM:
        return "a number"
    return " or ".join(dict.fromkeys(names[t] for t in p.types))


class Settings:
    """All parameters of a sorting run, validated.

    Accepts Kilosort4's setting names (a Kilosort4 ``settings`` dict can be passed as keyword arguments) and
    spikearray's own (``device``, ``chunk_seconds``, ``torch_threads``, ``seed``). See :data:`PARAMETERS` or
    ``docs/settings.md`` for every name, default and unit.

    Parameters
    ----------
    **values
        Parameter values by name. Unknown names raise :class:`~spikearray.errors.SettingsError` with the
        closest valid name. Names accepted only for Kilosort4 compatibility (:data:`IGNORED`) given a
        non-default value raise an :class:`IgnoredSettingWarning` naming them.

    Examples
    --------
    >>> s = Settings(Th_universal=10, nblocks=5)
    >>> s.nblocks
    5
    >>> Settings.from_json(s.to_json()) == s
    True
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        self._init(values)
        _warn_ignored(values)

    def _init(self, values: dict[str, Any]) -> None:
        unknown = [k for k in values if k not in _BY_NAME]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, list(_BY_NAME), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SettingsError(
                f"unknown setting {k!r}.{hint} Valid names are Kilosort4's plus spikearray's own;"
                " see spikearray.settings.PARAMETERS or docs/settings.md."
            )
        object.__setattr__(self, "_values", {p.name: _check(p, values.get(p.name, p.default)) for p in PARAMETERS})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_values":  # not a parameter (and not set yet while unpickling)
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"Settings has no parameter {name!r}.{hint}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are immutable; use settings.replace(name=value).")

    def __reduce__(self) -> tuple:
        # pickling (dask-distributed workers, multiprocessing, copy) rebuilds through the validating constructor
        return (_settings_from_values, (dict(self._values),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._values == other._values

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if v != _BY_NAME[k].default}
        inner = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"Settings({inner})"

    def replace(self, **changes: Any) -> "Settings":
        """Return a copy with some values changed (validated like the constructor; only the changed names can
        warn as ignored)."""
        new = Settings.__new__(Settings)
        new._init({**self._values, **changes})
        _warn_ignored(changes)
        return new

    def to_dict(self) -> dict[str, Any]:
        """All values as a plain dict (tuples as lists, infinity as ``"inf"``): JSON-serialisable."""
        out: dict[str, Any] = {}
        for k, v in self._values.items():
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, float) and math.isinf(v):
                v = "inf" if v > 0 else "-inf"
            out[k] = v
        return out

    def to_json(self) -> str:
        """Serialise to a JSON string (every parameter, defaults included)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        """Rebuild from :meth:`to_json` output (or any JSON object of parameter names)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingsError(f"settings JSON is not valid JSON ({e}); expected an object of name: value.") from None
        if not isinstance(data, dict):
            raise SettingsError(f"settings JSON must be an object of name: value, got {type(data).__name__}.")
        return cls(**data)

    @classmethod
    def of_sorting(cls, sorting: Any) -> "Settings":
        """The settings a Sorting Dataset was made with (its ``settings`` attr), with ``nt`` set to its template
        length; the defaults (with that ``nt``) when it has none or they do not parse (a foreign Kilosort folder
        read with :func:`spikearray.read_phy`)."""
        nt = int(sorting.sizes["sample"]) if "sample" in sorting.sizes else None
        try:
            s = cls.from_json(sorting.attrs.get("settings", "{}"))
        except SettingsError:
            s = cls()
        return s.replace(nt=nt) if nt is not None else s

    @classmethod
    def coerce(cls, settings: "Settings | dict | None") -> "Settings":
        """Accept ``None`` (defaults), a dict (Kilosort4 or spikearray names) or a Settings."""
        if settings is None:
            return cls()
        if isinstance(settings, Settings):
            return settings
        if isinstance(settings, dict):
            return cls(**settings)
        raise SettingsError(f"settings must be a Settings, a dict or None; got {type(settings).__name__}.")

    @classmethod
    def kilosort4(cls, **values: Any) -> "Settings":
        """Settings with Kilosort4's own defaults where spikearray's differ (``nblocks=1``, ``Th_universal=9``,
        ``Th_learned=8``), then ``values``."""
        return cls(**{**KILOSORT4_DEFAULTS, **values})

    # Derived values Kilosort4 computes from the others.
    @property
    def nt0min_(self) -> int:
        """Trough index within the waveform window (``int(20*nt/61)`` unless set)."""
        return self.nt0min if self.nt0min is not None else int(20 * self.nt / 61)

    def duplicate_spike_bins(self, sampling_rate: float) -> int:
        """``duplicate_spike_ms`` in samples at ``sampling_rate`` Hz."""
        return int(self.duplicate_spike_ms * sampling_rate / 1000)


def _settings_from_values(values: dict[str, Any]) -> Settings:
    """Unpickling helper for :class:`Settings` (a module-level function so pickle can name it); validates but does
    not warn again (every dask worker would repeat the user's warning)."""
    new = Settings.__new__(Settings)
    new._init(values)
    return new

"""Final merges after template matching (Kilosort4 §2.9) and duplicate-spike removal.

Template similarity throughout is that of denoised templates (:func:`denoised_templates`): channels that hold
only the noise left by averaging a few spikes are zeroed first, so a small unit's similarity and norm reflect
its waveform, not its spike count.

Units are visited in decreasing spike count; a refractory unit (its own ACG passes the ``acg_threshold``
test) is a seed. Its candidates are units whose template similarity (normalised cross-correlation, max over
lags) is ≥ 0.5, most similar first; the first one whose cross-correlogram with the seed is refractory
(``R12 < ccg_threshold`` and ``Q12 < 0.05``: the two trains never fire within a refractory period of each
other, so they are one neuron) is merged into it, its spike times shifted by the best template lag, and
the seed is examined again until nothing merges.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..metrics.refractory import ccg_metrics, is_cross_refractory, is_refractory
from .similarity import template_similarity

__all__ = ["ccg_merge", "drift_merge", "absorb_fragments", "same_waveform_merge", "denoised_templates", "redundant_units",
           "remove_duplicates"]


#: Largest ratio of template norms (whitened) of two units that may be merged. Pieces of one neuron (drift
#: pieces, fragments, a split cluster) have templates of nearly the same size; a refractory-looking CCG between
#: two neurons of very different size comes from matching pursuit itself, which can fit only one of two
#: overlapping templates within a millisecond, so their cross-correlogram dips at short lags. On the dense
#: 128-channel paper set this took 5 large units (100-250 uV) into smaller neighbours (norm ratios 1.5-4.5);
#: see docs/sorter.md for what it measured on every set.
MAX_NORM_RATIO = 1.5


def _norm_close(norms: np.ndarray, a: int, b: int) -> bool:
    lo, hi = sorted((float(norms[a]), float(norms[b])))
    return hi <= MAX_NORM_RATIO * lo


#: A channel of a unit's mean waveform takes part in merge similarity only when its energy (sum of squares over
#: the template's samples, whitened) exceeds this many times what a mean of ``n`` pure-noise spikes leaves there
#: (``nt / n``: whitened noise has unit variance). A 40-spike unit's mean carries ~0.16 of noise per sample on
#: each of 128 channels, a norm of ~14 against ~10-15 of signal at 30 µV: on the drifting dense paper set its
#: similarity to the unit it was cut from read 0.35 with everything, 0.74 on the channels that carry it.
NOISE_ENERGY_FACTOR = 4.0


#: How many null standard deviations (``1/sqrt(n_bins - 1)``) below zero the binned rates of two drift
#: pieces must correlate (one-sided p ≈ 0.006 per candidate pair).
RATE_CORRELATION_Z = 2.5

#: The drift merge's second pass (:func:`drift_merge`): templates this similar may join when their rates take
#: turns clearly (at most DRIFT_LOOSE_CORRELATION and DRIFT_LOOSE_Z null spreads below zero: -0.6 over 50
#: bins of 2 s, out of reach below 19 bins) and their norms are within MAX_NORM_RATIO. Replayed on the merge
#: inputs of the 128-channel drifting paper set it made five joins: four of one neuron's pieces (39-128 µV)
#: and a 12 µV unit's piece into a 43 µV unit (their denoised norms within 1.5×); without the norm test a
#: sixth joined a 122 µV unit's piece to a 28 µV unit. 0.7 instead of 0.6 gained one unit fewer.
DRIFT_LOOSE_SIMILARITY = 0.6
DRIFT_LOOSE_CORRELATION = -0.6
DRIFT_LOOSE_Z = 4.2

#: The drift merge's position test (:func:`drift_merge`, first pass only): the fraction of spike pairs in which
#: one piece's displacement exceeds the other's (an AUC, or 1 minus it) and the least difference of their mean
#: displacements (µm), for pieces of at least DRIFT_POSITION_SPIKES spikes. On the merge inputs of the drifting
#: sets (similarity >= 0.8, both pieces >= 80 % one planted unit): every pair at AUC <= 0.05 or >= 0.93 was two
#: pieces of one unit (20 pairs on P128-drift, 4 on GT-B), the first pair of two units came at 0.18 (P128-drift)
#: and one at 0.00 with norms 1.67× apart (GT-B: a 218 and a 333 µV unit). On the static sets the estimate
#: moves less than 1 µm and no pair differs by DRIFT_POSITION_UM.
DRIFT_POSITION_AUC = 0.9
DRIFT_POSITION_UM = 5.0
DRIFT_POSITION_SPIKES = 20


def denoised_templates(templates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Templates with the channels that hold only averaging noise set to zero.

    Parameters
    ----------
    templates : ndarray (K, C, nt)
        Whitened mean waveforms (noise of unit variance per sample).
    counts : ndarray (K,) int
        Spikes averaged into each template.

    Returns
    -------
    ndarray (K, C, nt) float64
        ``templates`` where a channel's energy exceeds :data:`NOISE_ENERGY_FACTOR` ``· nt / count``; zero
        elsewhere. A template none of whose channels pass keeps its strongest one.

    Examples
    --------
    >>> t = np.zeros((1, 3, 10)); t[0, 0, 4] = 2.0; t[0, 1] = 0.1
    >>> denoised_templates(t, np.array([100]))[0].any(axis=1).tolist()
    [True, False, False]
    """
    t = np.asarray(templates, dtype=np.float64)
    if t.size == 0:
        return t
    energy = (t ** 2).sum(2)
    nt = t.shape[2]
    keep = energy > NOISE_ENERGY_FACTOR * nt / np.maximum(np.asarray(counts, float), 1.0)[:, None]
    keep[np.arange(len(t)), energy.argmax(1)] = True
    return t * keep[:, :, None]


def _start(spike_time: np.ndarray, spike_unit: np.ndarray, templates: np.ndarray, max_lag: int | None):
    """Working copies of the spike table, the identity parent map, template similarity and lags (``None``
    when there is nothing to merge) and template norms, all on the denoised templates."""
    K = len(templates)
    t = spike_time.astype(np.int64).copy()
    u = spike_unit.astype(np.int64).copy()
    parent = np.arange(K)
    if K < 2:
        return t, u, parent, None, None, None
    clean = denoised_templates(templates, np.bincount(u, minlength=K))
    sim, lag = template_similarity(clean, max_lag if max_lag is not None else templates.shape[2] // 2)
    return t, u, parent, sim, lag, np.linalg.norm(clean.reshape(K, -1), axis=1)


def _root(parent: np.ndarray, x: int) -> int:
    """The surviving unit that ``x`` was merged into (the root of its union-find tree)."""
    while parent[x] != x:
        x = int(parent[x])
    return x


def _flatten(parent: np.ndarray) -> np.ndarray:
    """``parent`` with every unit pointing at its surviving unit directly (in place; returned)."""
    for k in range(len(parent)):
        parent[k] = _root(parent, k)
    return parent


def _unit_members(u: np.ndarray, K: int) -> dict[int, np.ndarray]:
    """Indices of each unit's spikes (increasing), for units ``0..K-1``, from one stable argsort: a mask per
    unit is O(spikes × units), ~2 s for 500 units and 1.2 M spikes."""
    order = np.argsort(u, kind="stable")
    edges = np.searchsorted(u[order], np.arange(K + 1))
    return {k: order[edges[k]:edges[k + 1]] for k in range(K)}


def ccg_merge(spike_time: np.ndarray, spike_unit: np.ndarray, templates: np.ndarray, *, sampling_rate: float,
              acg_threshold: float, ccg_threshold: float, min_similarity: float = 0.5,
              max_lag: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge units that are one neuron.

    Parameters
    ----------
    spike_time : ndarray (n,) int64, samples
    spike_unit : ndarray (n,) int64, 0..K-1
    templates : ndarray (K, C, nt)
    sampling_rate : float
    acg_threshold, ccg_threshold : float
        Kilosort4's thresholds.
    min_similarity : float
        Candidates need at least this template similarity.

    Returns
    -------
    spike_time : ndarray (n,) int64
        Times of merged spikes shifted by the template lag (unsorted order kept).
    spike_unit : ndarray (n,) int64
        Unit of each spike after merging (ids of the surviving seeds, not yet relabelled).
    parent : ndarray (K,) int64
        For each original unit, the unit it ended up in.
    """
    t, u, parent, sim, lag, norms = _start(spike_time, spike_unit, templates, max_lag)
    if sim is None:
        return t, u, parent
    K = len(templates)
    counts = np.bincount(u, minlength=K)
    members = _unit_members(u, K)
    fs = float(sampling_rate)
    order = np.argsort(-counts, kind="stable")
    for a in order:
        if parent[a] != a or counts[a] == 0:
            continue
        if not is_refractory(t[members[a]] / fs, acg_threshold)[0]:
            continue
        changed = True
        while changed:
            changed = False
            cands = [b for b in np.argsort(-sim[a], kind="stable")
                     if b != a and parent[b] == b and counts[b] > 0 and sim[a, b] >= min_similarity
                     and _norm_close(norms, a, b)]
            for b in cands:
                if is_cross_refractory(t[members[a]] / fs, t[members[b]] / fs, ccg_threshold):
                    t[members[b]] += lag[a, b]
                    u[members[b]] = a
                    members[a] = np.concatenate([members[a], members[b]])
                    members[b] = members[b][:0]
                    counts[a] += counts[b]
                    counts[b] = 0
                    parent[parent == b] = a
                    changed = True
                    break
    return t, u, parent


def drift_merge(spike_time: np.ndarray, spike_unit: np.ndarray, templates: np.ndarray, *, bin_samples: int,
                min_similarity: float = 0.8, max_rate_correlation: float = -0.3,
                loose_similarity: float = DRIFT_LOOSE_SIMILARITY, spike_displacement: np.ndarray | None = None,
                max_lag: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge pieces of one neuron that residual drift split in time.

    When drift correction is imperfect, the first clustering can cut a unit into pieces that take turns:
    one holds its spikes while the probe is up, the other while it is down. Their cross-correlogram shows
    no coincidences at any lag (they are rarely active together), so the refractory test of
    :func:`ccg_merge` cannot decide; but their templates are nearly identical and their firing-rate time
    courses are anti-correlated, which two distinct neurons' are not (on GT-B, split pieces scored
    similarity ≥ 0.88 with rate correlation ≤ −0.5; distinct units at most 0.84 and ≥ −0.17).

    Similarity is that of the denoised templates (:func:`denoised_templates`). On the drifting dense paper
    set (seed 2205) a threshold of 0.8 took well-detected units from 137 to 144 and false positives from 18
    to 16 against 0.85, with the static set unchanged; the static set's first wrong merge came at 0.7.

    Binned rates are a weak test for a unit of a few hundred spikes (a few per bin: Poisson noise hides the
    turns). Where the drift estimate at each spike is given, the first pass also joins two pieces that fired
    at different probe positions: the displacement at one's spikes is almost always above (or below) the
    other's (:data:`DRIFT_POSITION_AUC`), by :data:`DRIFT_POSITION_UM` or more on average, with template
    norms within :data:`MAX_NORM_RATIO`. A neuron's firing does not depend on where the probe is, so two
    neurons' spikes sample the same displacements (AUC ~0.5).

    A second pass then joins pieces whose templates differ more (similarity ≥ ``loose_similarity``) when the
    evidence of turn-taking is strong instead: rates anti-correlated at ``-DRIFT_LOOSE_Z / sqrt(n_bins - 1)``
    or below (and at most :data:`DRIFT_LOOSE_CORRELATION`), and template norms within
    :data:`MAX_NORM_RATIO` (one neuron's pieces have its size; a unit four times larger is another neuron).
    A large unit's footprint changes more with its position than a small one's: on the 384-channel drifting
    paper set five units above 150 µV were split into pure pieces whose rates correlate at -0.43 to -0.88
    and whose similarity is under 0.8.

    Parameters
    ----------
    spike_time, spike_unit : ndarray (n,)
    templates : ndarray (K, C, nt)
    bin_samples : int
        Width of the firing-rate bins (the drift batch length).
    min_similarity : float
        Template similarity needed.
    max_rate_correlation : float
        Pearson correlation of binned rates must be at most this, and at most
        ``-RATE_CORRELATION_Z / sqrt(n_bins - 1)`` (chance anti-correlation is large over few bins).
    loose_similarity : float
        Template similarity needed in the second pass (≥ ``min_similarity``: no second pass).
    spike_displacement : ndarray (n,), optional
        The drift estimate (µm) at each spike's time and its template's depth; enables the position test.

    Returns
    -------
    spike_time, spike_unit, parent : as :func:`ccg_merge`.
    """
    t, u, parent, sim, lag, norms = _start(spike_time, spike_unit, templates, max_lag)
    if sim is None or len(t) == 0:
        return t, u, parent
    K = len(templates)
    n_bins = int(t.max() // bin_samples) + 1
    if n_bins < 4:
        return t, u, parent
    # the rates of two independent neurons correlate by chance with a spread of ~1/sqrt(n_bins - 1): over a
    # 20 s recording (10 bins) two distinct neighbours of a four-shank test set read -0.37 and -0.44, so the
    # anti-correlation must also be RATE_CORRELATION_Z such spreads below zero (-0.36 at 50 bins, -0.83 at 10)
    spread = 1.0 / np.sqrt(n_bins - 1)
    passes = [(min_similarity, min(max_rate_correlation, -RATE_CORRELATION_Z * spread), False)]
    if loose_similarity < min_similarity:
        passes.append((loose_similarity, min(DRIFT_LOOSE_CORRELATION, -DRIFT_LOOSE_Z * spread), True))
    rates = np.zeros((K, n_bins))
    np.add.at(rates, (u, t // bin_samples), 1.0)
    counts = np.bincount(u, minlength=K)
    iu = np.triu_indices(K, 1)
    order = np.argsort(-sim[iu], kind="stable")
    disp = None if spike_displacement is None else np.asarray(spike_displacement, np.float64)
    for least, max_corr, loose in passes:
        for o in order:
            a, b = int(iu[0][o]), int(iu[1][o])
            if sim[a, b] < least:
                break
            ra, rb = _root(parent, a), _root(parent, b)
            if ra == rb or counts[ra] == 0 or counts[rb] == 0:
                continue
            same_size = _norm_close(norms, a, b)
            if loose and not same_size:
                continue
            if rates[ra].std() == 0 or rates[rb].std() == 0:
                continue
            corr = np.corrcoef(rates[ra], rates[rb])[0, 1]
            # the rates may not show the turns that the positions do (first pass only: under 0.8, pieces of two
            # drift-split neighbours fired apart as well)
            if corr > max_corr and not (disp is not None and not loose and same_size
                                        and _fired_apart(disp[u == ra], disp[u == rb])):
                continue
            keep, drop = (ra, rb) if counts[ra] >= counts[rb] else (rb, ra)
            m = u == drop
            t[m] += lag[keep, drop]
            u[m] = keep
            rates[keep] += rates[drop]
            rates[drop] = 0
            counts[keep] += counts[drop]
            counts[drop] = 0
            parent[drop] = keep
    return t, u, _flatten(parent)


def _fired_apart(da: np.ndarray, db: np.ndarray) -> bool:
    """Whether two spike sets fired at different probe positions: the displacement at one's spikes exceeds the
    other's in at least :data:`DRIFT_POSITION_AUC` of the pairs (or in at most 1 minus that), and their means
    differ by at least :data:`DRIFT_POSITION_UM` µm."""
    if len(da) < DRIFT_POSITION_SPIKES or len(db) < DRIFT_POSITION_SPIKES:
        return False
    if abs(da.mean() - db.mean()) < DRIFT_POSITION_UM:
        return False
    ranks = rankdata(np.concatenate([da, db]))  # ties share their mean rank
    auc = (ranks[:len(da)].sum() - len(da) * (len(da) + 1) / 2) / (len(da) * len(db))
    return abs(auc - 0.5) >= DRIFT_POSITION_AUC - 0.5


def absorb_fragments(spike_time: np.ndarray, spike_unit: np.ndarray, templates: np.ndarray, *, sampling_rate: float,
                     acg_threshold: float, max_fraction: float = 0.25, min_similarity: float = 0.85,
                     max_lag: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold small fragments into the similar, much larger unit they were cut from.

    A fragment (fewer than ``max_fraction`` of the spikes of its most similar unit, similarity ≥
    ``min_similarity``) joins that unit when the union still passes the refractory test — a piece of the
    same neuron adds no refractory violations, a different neuron would.

    That test has little power for a fragment of a few dozen spikes (a distinct neuron of 70 spikes beside
    one of 1,300 adds ~3 expected coincidences in 100 s), so the waveform must decide: on denoised
    templates a threshold of 0.75 folded five distinct low-rate units (31-114 spikes, 38-204 µV) of the
    static dense paper set into big neighbours; 0.85 folded none of them.

    Returns
    -------
    spike_time, spike_unit, parent : as :func:`ccg_merge`.
    """
    t, u, parent, sim, lag, norms = _start(spike_time, spike_unit, templates, max_lag)
    if sim is None:
        return t, u, parent
    K = len(templates)
    np.fill_diagonal(sim, -np.inf)
    counts = np.bincount(u, minlength=K)
    fs = float(sampling_rate)
    for f in np.argsort(counts, kind="stable"):
        if counts[f] == 0:
            continue
        alive = counts > 0
        cand = np.where(alive, sim[f], -np.inf)
        big = int(np.argmax(cand))
        if cand[big] < min_similarity or counts[f] >= max_fraction * counts[big] or not _norm_close(norms, f, big):
            continue
        joint = np.sort(np.concatenate([t[u == big], t[u == f] + lag[big, f]]))
        if not is_refractory(joint / fs, acg_threshold)[0]:
            continue
        m = u == f
        t[m] += lag[big, f]
        u[m] = big
        counts[big] += counts[f]
        counts[f] = 0
        parent[parent == f] = big
    return t, u, parent


#: Largest ratio of the squared distance between two units' mean features to what averaging noise alone leaves
#: there (``Σ var_a / n_a + var_b / n_b`` over the features on their common channels) at which
#: :func:`same_waveform_merge` takes them for one unit. Measured on the dense paper sets (seed 2205) after the
#: other merges: pure pieces of one planted unit read 1.1-2.9 (and 10.6 for one pair) on the static set, 2.6-7.1
#: on the drifting one; pairs of distinct units 16 and up (static) and 6.0 and up (drifting).
SAME_WAVEFORM_RATIO = 4.0

#: Feature channels two units must share for :func:`same_waveform_merge` to compare them (of ``nearest_chans``).
SAME_WAVEFORM_CHANNELS = 6

#: Spikes per unit used for its mean and variance (evenly spaced in time).
SAME_WAVEFORM_SPIKES = 400

#: Pairs whose strongest feature channels lie within :data:`SAME_WAVEFORM_NEAR_UM` of each other merge up to
#: this ratio. The matching gives each spike to the template that fits it best, so two pieces of one neuron
#: are selected by their noise and their means differ by a fixed fraction of a spike's scatter: a ratio that
#: grows with the spike count. On P384-static, pairs of pure pieces of one planted unit read median 21
#: (90th percentile 116), pairs of distinct units 1st percentile 28. Replayed (dumped matched spikes, after
#: the other merges; well detected / false positives), limits 4 → 16 / 24 / 32 / 64 near: P384-static
#: 363/75 → 364/52, 367/44, 367/42, 365/26; P128-drift 142/12 → 143/11, 143/9, 143/8, 141/5; P128-static
#: 174/3 → 173/2 at 16-32, 171/0 at 64; GT-A, GT-B, GT-N12 unchanged at all limits.
SAME_WAVEFORM_RATIO_NEAR = 32.0

#: Distance (µm) between two units' strongest feature channels within which :data:`SAME_WAVEFORM_RATIO_NEAR`
#: applies: the same or a neighbouring contact of a Neuropixels column (20 µm rows, 16-32 µm across).
SAME_WAVEFORM_NEAR_UM = 25.0


def same_waveform_merge(spike_time: np.ndarray, spike_unit: np.ndarray, spike_template: np.ndarray,
                        features: np.ndarray, feature_channels: np.ndarray, *, sampling_rate: float,
                        acg_threshold: float, positions: np.ndarray | None = None,
                        max_ratio: float = SAME_WAVEFORM_RATIO, max_ratio_near: float = SAME_WAVEFORM_RATIO_NEAR,
                        near_um: float = SAME_WAVEFORM_NEAR_UM,
                        min_common: int = SAME_WAVEFORM_CHANNELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge units whose mean waveforms differ by no more than the noise of averaging their spikes.

    The other merges compare template *similarity*, which cannot tell a small unit cut into pieces of 30-60
    spikes (each piece's mean carries so much averaging noise that two pieces of one neuron read 0.65-0.75
    alike) from two neighbours. This test asks instead whether the difference of the two means is what the
    spikes' own scatter predicts: on the feature channels the two units share, ``|mean_a - mean_b|²`` against
    ``Σ var_a / n_a + var_b / n_b`` (the expected value of the former if both are samples of one waveform).
    A pair at most ``max_ratio`` is merged, most alike first, unless the union shows refractory violations
    (Kilosort4's contamination ``R12`` at least ``acg_threshold``).
    Pieces of one neuron that the matching split by their noise sit at one place but differ by more than
    averaging noise (their ratio grows with the spike count): with ``positions``, a pair whose strongest
    feature channels lie within ``near_um`` merges up to ``max_ratio_near``.

    Groups join by complete linkage: two groups of already merged units join only when every pair of their
    members that was compared (enough shared channels) passes. With single linkage one small, noisy piece
    bridged distinct neurons: on the dense static paper set a 25-spike piece of a 23 µV unit passed the test
    with a 49 µV unit (ratio 21) and with a 51 µV unit beside it (26), and the three became one unit.

    Parameters
    ----------
    spike_time : ndarray (n,) int64, samples
    spike_unit : ndarray (n,) int64
        Unit of each spike after the earlier merges (a surviving template id).
    spike_template : ndarray (n,) int64
        Template each spike was matched with: a unit's statistics use the spikes of its own template, whose
        ``features`` are on its own ``feature_channels``.
    features : ndarray (n, nC, P)
        PC features of each spike on ``feature_channels[spike_template]`` (whitened).
    feature_channels : ndarray (K, nC) int64
    sampling_rate : float
    acg_threshold : float
        Kilosort4's refractory threshold: a union whose ``R12`` reaches it is not merged.
    positions : ndarray (C, 2), µm, optional
        Contact positions (channel order of ``feature_channels``); without them only ``max_ratio`` applies.
    max_ratio : float
        :data:`SAME_WAVEFORM_RATIO`.
    max_ratio_near : float
        :data:`SAME_WAVEFORM_RATIO_NEAR`.
    near_um : float
        :data:`SAME_WAVEFORM_NEAR_UM`.
    min_common : int
        :data:`SAME_WAVEFORM_CHANNELS`.

    Returns
    -------
    spike_time, spike_unit, parent : as :func:`ccg_merge`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(size=(3, 2))  # one waveform, seen by two units of 40 spikes each
    >>> f = w + rng.normal(size=(80, 3, 2))
    >>> u = np.repeat([0, 1], 40)
    >>> t = np.cumsum(rng.integers(300, 3000, 80))
    >>> same_waveform_merge(t, u, u, f, np.array([[0, 1, 2], [0, 1, 2]]), sampling_rate=30000.0,
    ...                     acg_threshold=0.2, min_common=3)[1].tolist() == [0] * 80
    True
    """
    t = np.asarray(spike_time, np.int64).copy()
    u = np.asarray(spike_unit, np.int64).copy()
    K = len(feature_channels)
    parent = np.arange(K)
    counts = np.bincount(u, minlength=K)
    members = _unit_members(u, K)
    samples, peak = {}, {}
    for a in map(int, np.flatnonzero(counts > 0)):
        own = members[a][spike_template[members[a]] == a]
        if len(own) < 10:
            continue
        if len(own) > SAME_WAVEFORM_SPIKES:
            own = own[np.linspace(0, len(own) - 1, SAME_WAVEFORM_SPIKES).round().astype(np.int64)]
        samples[a] = np.asarray(features[own], np.float64)
        # the unit's strongest feature channel: largest norm of its mean PC features
        peak[a] = int(feature_channels[a][np.linalg.norm(samples[a].mean(0), axis=1).argmax()])
    pos = None if positions is None else np.asarray(positions, np.float64)
    pairs = []
    verdict: dict[tuple[int, int], bool] = {}  # every compared pair, passed or not
    units = sorted(samples)
    # shared feature channels of every pair in one product; only pairs with enough of them are compared
    # (intersect1d on all ~118,000 pairs of P384-static took 3 s)
    chans = np.asarray(feature_channels)[units] if units else np.zeros((0, 1), np.int64)
    onehot = np.zeros((len(units), int(chans.max(initial=0)) + 1), np.float32)
    onehot[np.repeat(np.arange(len(units)), chans.shape[1]), chans.ravel()] = 1.0
    shared = onehot @ onehot.T
    for i, a in enumerate(units):
        for j in np.flatnonzero(shared[i, i + 1:] >= min_common) + i + 1:
            b = units[j]
            common, ia, ib = np.intersect1d(feature_channels[a], feature_channels[b], return_indices=True)
            xa = samples[a][:, ia].reshape(len(samples[a]), -1)
            xb = samples[b][:, ib].reshape(len(samples[b]), -1)
            noise = (xa.var(0, ddof=1) / len(xa) + xb.var(0, ddof=1) / len(xb)).sum()
            if noise <= 0:
                continue
            ratio = float(((xa.mean(0) - xb.mean(0)) ** 2).sum() / noise)
            near = pos is not None and np.linalg.norm(pos[peak[a]] - pos[peak[b]]) <= near_um
            passed = ratio <= (max(max_ratio, max_ratio_near) if near else max_ratio)
            verdict[(a, b)] = verdict[(b, a)] = passed
            if passed:
                pairs.append((ratio, a, b))
    pairs.sort()
    # complete linkage: the units already joined into each side are compared too (see the docstring)
    group = {a: [a] for a in range(K)}
    fs = float(sampling_rate)
    for _, a, b in pairs:
        ra, rb = _root(parent, a), _root(parent, b)
        if ra == rb:
            continue
        if not all(verdict.get((x, y), True) for x in group[ra] for y in group[rb]):
            continue
        joint = np.sort(t[np.concatenate([members[ra], members[rb]])]) / fs
        # a veto on evidence of violations (contamination R12 at or above acg_threshold), not a demand for
        # evidence of refractoriness: Kilosort4's Q12 < 0.2 cannot be met by a union of a few dozen spikes
        # (a 30-spike union reads Q12 ~0.4 with no violation at all), so the pieces of a low-rate unit that the
        # waveform test joins stayed apart. R12 needs a baseline too (its far flanks are empty below ~100 spikes
        # per 100 s, and it reads 0): for such small unions the waveform test decides alone. Replaying the
        # merges on the dense paper sets' matched spikes: P128-drift's false-positive units 8 -> 6 (a 34 µV
        # unit's pieces of 29 and 43 spikes joined; a 26-spike unit of mixed small spikes joined an 83-spike
        # one), P128-static, P384-static, GT-A, GT-B and GT-N12 unchanged; full sorts: P128-drift 143 / 8 ->
        # 144 / 7, P384-drift 306 / 35 -> 306 / 32, the others unchanged (docs/benchmarks.md).
        if ccg_metrics(joint, joint, acg=True)[0] >= acg_threshold:
            continue
        keep, drop = (ra, rb) if counts[ra] >= counts[rb] else (rb, ra)
        u[members[drop]] = keep
        members[keep] = np.concatenate([members[keep], members.pop(drop)])
        counts[keep] += counts[drop]
        counts[drop] = 0
        parent[drop] = keep
        group[keep] += group.pop(drop)
    return t, u, _flatten(parent)


def redundant_units(spike_time: np.ndarray, spike_unit: np.ndarray, n_units: int, *, delta: int,
                    max_fraction: float = 0.5, norms: np.ndarray | None = None) -> np.ndarray:
    """Units whose spikes mostly coincide with another, larger unit's: residual catchers, not neurons.

    When a template fits a spike imperfectly (residual drift, a waveform that changes shape), what is left
    can be picked up by a second, weaker template at the same time. Such a unit has most of its spikes within
    ``delta`` samples of spikes of one bigger unit; two distinct neurons essentially never do.
    With ``norms`` (template norms, whitened), only the weaker template of such a pair is a catcher: what
    a catcher fits is a left-over, smaller than the spike it is left over from. (On the dense paper set an
    89 µV unit firing 50 spikes was dropped because a 25 µV template caught its residuals 185 times.)

    Returns
    -------
    ndarray of bool (n_units,)
        True for units to drop.
    """
    counts = np.bincount(spike_unit, minlength=n_units)
    drop = np.zeros(n_units, bool)
    trains = [np.sort(spike_time[spike_unit == k]) for k in range(n_units)]
    for a in np.argsort(counts, kind="stable"):
        if counts[a] == 0:
            continue
        ta = trains[a]
        for b in range(n_units):
            if b == a or drop[b] or counts[b] <= counts[a]:
                continue
            if norms is not None and norms[a] > norms[b]:
                continue
            tb = trains[b]
            i = np.clip(np.searchsorted(tb, ta), 1, len(tb) - 1) if len(tb) > 1 else np.zeros(len(ta), int)
            near = np.minimum(np.abs(tb[i] - ta), np.abs(tb[i - 1] - ta)) if len(tb) > 1 else np.abs(tb[0] - ta)
            if (near <= delta).mean() >= max_fraction:
                drop[a] = True
                break
    return drop


def remove_duplicates(spike_time: np.ndarray, spike_unit: np.ndarray, min_gap: int) -> np.ndarray:
    """Boolean mask of spikes kept: a spike closer than ``min_gap`` samples after the last kept spike of the
    same unit is a duplicate (Kilosort4's ``duplicate_spike_ms`` rule). Input must be sorted by time."""
    keep = np.ones(len(spike_time), bool)
    if min_gap <= 0 or len(spike_time) == 0:
        return keep
    order = np.lexsort((spike_time, spike_unit))
    t = spike_time[order]
    u = spike_unit[order]
    last_t = None
    last_u = None
    for i in range(len(t)):
        if last_u == u[i] and t[i] - last_t < min_gap:
            keep[order[i]] = False
            continue
        last_t, last_u = t[i], u[i]
    return keep

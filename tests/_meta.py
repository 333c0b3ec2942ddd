"""Hand-written SpikeGLX .meta fixtures (NP1.0 and NP2.0 4-shank, 385 saved channels with sync)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def np1_meta(n_samples: int, *, geom: bool = True, file_size: int | None = None) -> dict[str, str]:
    imro = "(0,384)" + "".join(f"({c} 0 0 500 250 1)" for c in range(384))
    meta = {
        "acqApLfSy": "384,384,1", "appVersion": "20230202", "fileSizeBytes": str(file_size or n_samples * 385 * 2),
        "imAiRangeMax": "0.6", "imAiRangeMin": "-0.6", "imDatPrb_pn": "NP1000", "imDatPrb_sn": "18005116",
        "imDatPrb_type": "0", "imMaxInt": "512", "imSampRate": "30000.123", "nSavedChans": "385",
        "snsApLfSy": "384,0,1", "snsSaveChanSubset": "0:383,768", "typeThis": "imec", "userNotes": "",
        "~imroTbl": imro,
        "~snsChanMap": "(384,384,1)" + "".join(f"(AP{c};{c}:{c})" for c in range(384)) + "(SY0;768:768)",
    }
    if geom:
        rows = []
        for c in range(384):
            r, col = c // 2, c % 2
            rows.append(f"(0:{(27 if r % 2 == 0 else 11) + 32 * col}:{20 * r}:1)")
        meta["~snsGeomMap"] = "(NP1000,1,0,70)" + "".join(rows)
    else:
        meta["~snsShankMap"] = "(1,2,480)" + "".join(f"(0:{c % 2}:{c // 2}:1)" for c in range(384))
    return meta


def np2_4shank_meta(n_samples: int) -> dict[str, str]:
    # 96 channels per shank, electrodes 0..95 on each (rows 0..47), no snsGeomMap: geometry from imroTbl.
    entries = "".join(f"({c} {c // 96} 0 0 {c % 96})" for c in range(384))
    return {
        "acqApLfSy": "384,0,1", "fileSizeBytes": str(n_samples * 385 * 2), "imAiRangeMax": "0.5",
        "imAiRangeMin": "-0.5", "imDatPrb_pn": "NP2010", "imDatPrb_type": "24", "imMaxInt": "8192",
        "imSampRate": "30000", "nSavedChans": "385", "snsApLfSy": "384,0,1", "snsSaveChanSubset": "all",
        "typeThis": "imec", "~imroTbl": "(24,384)" + entries,
    }


def write_pair(folder: Path, name: str, meta: dict[str, str], data: np.ndarray) -> Path:
    """Write ``data`` (n, 385) int16 and ``meta`` (CRLF lines) as ``name.ap.bin`` + ``.ap.meta``."""
    bin_path = folder / f"{name}.ap.bin"
    np.ascontiguousarray(data, dtype="<i2").tofile(bin_path)
    bin_path.with_suffix(".meta").write_bytes("".join(f"{k}={v}\r\n" for k, v in meta.items()).encode())
    return bin_path

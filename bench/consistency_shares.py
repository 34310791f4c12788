"""Does scoring each consistency gamma on an interleaved share of the slices rank candidates like scoring every
gamma on every slice? (The shares make the adaptation's candidate scoring one pass per perturbation set cheaper.)

    python bench/consistency_shares.py --work /tmp/convlora-shares     # -> bench/results/consistency_shares.json

For each simulated site: a 4-volume cohort (2 heads x 2 subjects), ``convlora-adabn`` fast with 3 epochs, then every
candidate (source, adabn, epoch 1-3) scored on the 4 volumes both ways; reports the Spearman correlation between
the two consistencies over every (volume, candidate) and whether both pick the same candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from ConvLoRASegLib import selection, selftrain, store  # noqa: E402
from ConvLoRASegLib.segment import predict_slices  # noqa: E402
from ConvLoRASegLib.volumes import read_image, to_slices  # noqa: E402
from make_cohort import make_site_cohort  # noqa: E402


def full_consistency(model, slices, final) -> float:
    """The previous definition: every gamma on every slice."""
    x = np.clip(slices, 0, 1)
    sp = model.grid.spacing_mm
    return float(np.mean([selection.agreement(final, predict_slices(model, (x ** g).astype(np.float32), "cpu"), sp)
                          for g in selection.CONSISTENCY_GAMMAS]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/convlora-shares"))
    ap.add_argument("--sites", nargs="+", default=["philips15", "siemens3"])
    ap.add_argument("--heads", nargs="+", default=["colin27", "mni152_nlin6asym"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "consistency_shares.json")
    a = ap.parse_args()
    model = store.load_model(store.default_model_path())
    rows, picks = [], {}
    t0 = time.perf_counter()
    for site in a.sites:
        files = make_site_cohort(site, 2, a.heads, a.work / site, seed=7)
        vols = [to_slices(read_image(i), model.grid).slices for i, _ in files]
        res = selftrain.adapt(model, vols, epochs=3, device="cpu", selection_volumes=len(vols))
        table_new, table_old, cons_new, cons_old = {}, {}, {}, {}
        for name in res.candidate_states:
            m = selftrain.candidate_model(model, res, name)
            new, old = [], []
            for k, v in enumerate(vols):
                final, early = predict_slices(m, v, "cpu", with_esh=True)
                s_new = selection.score_model(m, v, "cpu", predicted=(final, early))
                c_old = full_consistency(m, v, final)
                s_old = selection.VolumeScore(s_new.agreement, c_old, s_new.brain_ml, s_new.plausible)
                new.append(s_new)
                old.append(s_old)
                rows.append({"site": site, "candidate": name, "volume": k, "consistency_shares": s_new.consistency,
                             "consistency_full": c_old, "agreement": s_new.agreement})
            cn, co = selection.CandidateScore.of(new), selection.CandidateScore.of(old)
            table_new[name], table_old[name] = cn.value, co.value
            cons_new[name], cons_old[name] = cn.consistency, co.consistency
        order = [selection.SOURCE, "adabn"]
        picks[site] = {"shares": selection.choose(table_new, order, cons_new),
                       "full": selection.choose(table_old, order, cons_old),
                       "table_shares": table_new, "table_full": table_old}
        print(site, picks[site], flush=True)
    x = [r["consistency_shares"] for r in rows]
    y = [r["consistency_full"] for r in rows]
    out = {"spearman": selection.spearman(x, y), "pearson": float(np.corrcoef(x, y)[0, 1]),
           "mean_abs_diff": float(np.mean(np.abs(np.subtract(x, y)))), "n": len(rows), "picks": picks,
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
           "date": time.strftime("%Y-%m-%d"), "command": "python bench/consistency_shares.py"}
    a.out.write_text(json.dumps(out, indent=1))
    print({k: v for k, v in out.items() if k not in ("rows", "picks")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

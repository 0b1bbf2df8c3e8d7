"""Perplexity against the kept share of rows from two `eval perplexity` runs with '+keep<P>' methods (hashes trained
with top_weight_power a = 1 and the paper's a = 0): one plot and one table, from their JSON files.

    python experiments/plot_budget_sweep.py experiments/results/quality/h100_keep
"""

import json
import os
import sys

from spotlight_jax.bench.common import markdown_table
from spotlight_jax.eval.perplexity import method_family, plot_vs_keep


def main(folder: str):
    runs = {"a1": "a = 1", "a0": "a = 0, the paper's loss"}
    rows, dense = [], None
    for tag, note in runs.items():
        with open(os.path.join(folder, f"perplexity_{tag}.json")) as f:
            run = json.load(f)
        for r in run["rows"]:
            if r["method"] == "dense":
                dense = dense or r["ppl"]
                if tag != "a1":
                    continue
            elif r["method"].startswith("spotlight"):
                r = {**r, "method": r["method"].replace("spotlight-128", f"spotlight-128 ({note})")}
            elif tag != "a1":
                continue
            rows.append(r)
    plot_vs_keep(rows, dense, os.path.join(folder, "perplexity_vs_keep.png"))
    table = {}
    for r in rows:
        if r["keep_ratio"] is not None:
            table.setdefault(method_family(r["method"]), {})[f"{100 * r['keep_ratio']:g} %"] = (
                f"{r['ppl']:.2f} ({r['vs_dense_pct']:+.1f} %)"
            )
    md = [{"method": m, **cols} for m, cols in table.items()]
    text = f"dense {dense:.2f}; perplexity (vs dense) at each kept share of rows\n\n" + markdown_table(md) + "\n"
    with open(os.path.join(folder, "perplexity_vs_keep.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/quality/h100_keep")

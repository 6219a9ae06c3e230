"""Inverse of py2nb: dump a notebook as a percent-format script for editing. Usage: python dev/nb2py.py nbs/X.ipynb draft.py"""
import sys, json
nb = json.load(open(sys.argv[1])); parts = []
for c in nb["cells"]:
    src = "".join(c["source"])
    if c["cell_type"] == "markdown": parts.append("# %% [markdown]\n" + "\n".join("# " + l if l else "#" for l in src.splitlines()))
    else: parts.append("# %%\n" + src)
open(sys.argv[2], "w").write("\n\n".join(parts) + "\n"); print(f"wrote {sys.argv[2]}")

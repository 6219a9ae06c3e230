"""Convert a percent-format script into a notebook (authoring helper; the notebook is the source of truth).

Cells are separated by lines `# %%` (code) or `# %% [markdown]` (markdown; each line starts with `# `).
Usage: python dev/py2nb.py draft.py nbs/NN_name.ipynb
"""
import sys, json, re, uuid, hashlib

def parse(text):
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        src = "\n".join(buf).strip("\n")
        if kind == "markdown":
            src = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in src.splitlines())
        cells.append((kind, src))
    for line in text.splitlines():
        m = re.match(r"^# %%( \[markdown\])?\s*$", line)
        if m:
            flush(); kind = "markdown" if m.group(1) else "code"; buf = []
        else:
            buf.append(line)
    flush()
    return cells

def to_nb(cells, name):
    out = []
    for i, (kind, src) in enumerate(cells):
        cid = hashlib.sha1(f"{name}-{i}".encode()).hexdigest()[:8]
        c = {"cell_type": kind, "id": cid, "metadata": {}, "source": src.splitlines(keepends=True)}
        if kind == "code": c.update(execution_count=None, outputs=[])
        out.append(c)
    return {"cells": out, "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}

if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    nb = to_nb(parse(open(src).read()), dst)
    with open(dst, "w") as f: json.dump(nb, f, indent=1, ensure_ascii=False); f.write("\n")
    print(f"wrote {dst}: {len(nb['cells'])} cells")

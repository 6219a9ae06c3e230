"""The numbers a sweep records, read from a base_train log (the lines base_train really prints).

    python runs/train_log_stats.py LOG FIELD [FIELD ...]     # prints the fields comma-separated, one CSV row chunk

Fields: params_<bucket> for each bucket of the "Parameter counts:" block (wte, value_embeds, lm_head,
transformer_matrices, scalars, total); num_params (= params_total); num_scaling_params (transformer_matrices +
lm_head, what base_train sizes the horizon by); model_dim (n_embd of the printed model config); num_iterations;
total_batch_size (from "Total batch size N => ..."); tokens_trained (num_iterations x total_batch_size: the logged
batch, not an assumed 2^19); param_data_ratio (tokens_trained / num_scaling_params); val_bpb and core_score (the last
value logged; empty when the run never measured it). A log that base_train appended to on resume holds several
attempts: the last one wins. A missing required line is an error that names it.
"""
import re
import sys

PATTERNS = {  # field -> regex with one group, matched per line; the last match wins
    "model_dim": r'^\s*"n_embd": (\d+)',
    "num_iterations": r"^Calculated number of iterations: ([\d,]+)",
    "total_batch_size": r"^Total batch size ([\d,]+) =>",
    "val_bpb": r"\| Validation bpb: ([\d.]+|inf|nan)\s*$",
    "core_score": r"\| CORE metric: (-?[\d.]+)\s*$",
}
OPTIONAL = {"val_bpb", "core_score"}
BUCKET = re.compile(r"^(wte|value_embeds|lm_head|transformer_matrices|scalars|total)\s+: ([\d,]+)\s*$")


def parse_log(text):
    "{field: str} of everything the log holds."
    out = {}
    for line in text.splitlines():
        m = BUCKET.match(line)
        if m:
            out[f"params_{m.group(1)}"] = m.group(2).replace(",", "")
        for field, pattern in PATTERNS.items():
            m = re.search(pattern, line)
            if m:
                out[field] = m.group(1).replace(",", "")
    return out


def stats(text, log_name="log"):
    "The parsed fields plus the derived ones; raises ValueError naming the first missing required line."
    s = parse_log(text)
    required = {"params_total": "total ...: N (the 'Parameter counts:' block)",
                "params_lm_head": "lm_head ...: N", "params_transformer_matrices": "transformer_matrices ...: N",
                "model_dim": '"n_embd": N (the model config)',
                "num_iterations": "Calculated number of iterations: N", "total_batch_size": "Total batch size N => ..."}
    for field, line in required.items():
        if field not in s:
            raise ValueError(f"{log_name} has no '{line}' line: did base_train get past its setup? "
                             f"(see the log; rerun the sweep to retry)")
    s["num_params"] = s["params_total"]
    s["num_scaling_params"] = str(int(s["params_transformer_matrices"]) + int(s["params_lm_head"]))
    s["tokens_trained"] = str(int(s["num_iterations"]) * int(s["total_batch_size"]))
    s["param_data_ratio"] = f"{int(s['tokens_trained']) / int(s['num_scaling_params']):.2f}"
    return s


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    log_path, fields = argv[0], argv[1:]
    with open(log_path, encoding="utf-8", errors="replace") as f:
        try:
            s = stats(f.read(), log_path)
        except ValueError as e:
            sys.exit(f"train_log_stats: {e}")
    unknown = [f for f in fields if f not in s and f not in OPTIONAL and f not in PATTERNS]
    if unknown:
        sys.exit(f"train_log_stats: unknown field(s) {unknown}; known: {sorted(set(s) | OPTIONAL)}")
    print(",".join(s.get(f, "") for f in fields))


if __name__ == "__main__":
    main(sys.argv[1:])

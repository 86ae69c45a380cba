"""
How much of the six lecture files is the lecture's idea: a line count, per file, by a rule written down here.

    python docs/lecture_lines.py              # this checkout
    python docs/lecture_lines.py --root DIR   # another checkout of the project (e.g. an older commit)

Every top-level function and class of a file is the lecture's, unless its name is in SUPPORT below: the
command line (argparse builders, main, the `if __name__` block), reading and writing files and the hub's
formats, guards that check inputs and runs, recovery and resuming, printing and formatting. The lines between
definitions (the module docstring, imports, section comments, constants) count with the lecture. A method
counts with its class.
"""
import argparse
import ast
import os

FILES = ("gpt2.py", "clip_loader.py", "bridges.py", "train_lm.py", "train_caption.py", "evaluate.py")
SUPPORT = {
    "gpt2.py": {"SubsetTokenizer", "load_lm"},
    "clip_loader.py": {"config_from_hub", "hub_to_ours", "ours_to_hub", "config_to_hub", "load_clip",
                       "to_rgb", "parse_grid", "encoder_param_counts", "is_untrained", "describe",
                       "random_clip_id"},
    "bridges.py": {"check_tokens", "flag", "captioner_from_config", "load_captioner", "lm_fingerprint",
                   "count_params"},
    "train_lm.py": {"check_resumable", "restore", "report", "note", "hellaswag_examples", "sample_prompt",
                    "print_step", "print_samples", "get_args", "main", "optimizer_step", "micro_batch",
                    "train_or_advise"},
    "train_caption.py": {"check_resumable", "restore", "wants_on_device", "parameter_counts", "get_args",
                         "main", "new_captioner", "bridge_overrides", "log_val_loss", "val_subset",
                         "StepLog"},
    "evaluate.py": {"_sync", "check_features", "encoded_images", "run_name", "evaluation_set", "in_cache",
                    "check_unseen", "extra_scorer", "draw_pictures", "final_val_loss", "_fmt_params",
                    "_fmt", "markdown_table", "caption_folder", "parse_args", "main", "clear_outputs",
                    "single_image_cider_note", "list_images", "not_an_image", "named", "one_line"},
}


def count(path, support):
    """(lines in all, lines of support code) of one file."""
    with open(path) as f:
        source = f.read()
    lines = source.count("\n")
    tree = ast.parse(source)
    support_lines = 0
    for node in tree.body:
        is_main = isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
        name = getattr(node, "name", None)
        if is_main or name in support:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            support_lines += node.end_lineno - first + 1
    return lines, support_lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    total = support = 0
    print(f"{'file':18s} {'lines':>6s} {'support':>8s} {'lecture':>8s}")
    for name in FILES:
        n, s = count(os.path.join(args.root, name), SUPPORT[name])
        total, support = total + n, support + s
        print(f"{name:18s} {n:6d} {s:8d} {(n - s) / n:8.0%}")
    print(f"{'all six':18s} {total:6d} {support:8d} {(total - support) / total:8.0%}")

"""
    python -m torch.distributed.run --nproc_per_node=2 tests/hide_on_rank1.py DIR[:DIR...] train_lm.py ARGS...

Runs a script as if the process of rank 1 could not see the given folders: a second machine without the first
one's disk. For rank 1 they do not exist (os.path.exists/isfile/isdir, open, glob), so any decision it made
from its own disk, instead of taking rank 0's, shows (tests/test_train_lm.py).
"""
import builtins
import glob
import os
import runpy
import sys

hidden = [os.path.abspath(p) for p in sys.argv[1].split(os.pathsep)]
script, sys.argv = sys.argv[2], sys.argv[2:]


def is_hidden(path):
    try:
        path = os.path.abspath(os.fspath(path))
    except TypeError:  # a file descriptor
        return False
    return any(path == h or path.startswith(h + os.sep) for h in hidden)


if os.environ.get("RANK") == "1":
    for name in ("exists", "isfile", "isdir"):
        setattr(os.path, name, lambda path, real=getattr(os.path, name): not is_hidden(path) and real(path))
    real_open, real_glob = builtins.open, glob.glob

    def blind_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and is_hidden(file):
            raise FileNotFoundError(2, "not on this machine (hidden from rank 1)", file)
        return real_open(file, *args, **kwargs)

    builtins.open = blind_open
    glob.glob = lambda pattern, *args, **kwargs: ([] if is_hidden(os.path.dirname(pattern))
                                                  else real_glob(pattern, *args, **kwargs))

sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")

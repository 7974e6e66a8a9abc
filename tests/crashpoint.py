"""Run the fpvault CLI, and die (as kill -9 would: no cleanup, no lock released)
right after its Nth write or delete of a pack, an index file or a manifest.

    python crashpoint.py N fpvault-args...

N < 0 runs to the end and prints how many such operations there were, on stderr
as "crashpoint: K operations"."""

import os
import sys

from fpvault import backend
from fpvault.cli import main

STEPS = ("data/", "index/", "snapshots/")
at = int(sys.argv[1])
done = 0


def counted(op):
    def wrapper(self, name, *args):
        global done
        result = op(self, name, *args)
        if name.startswith(STEPS):
            done += 1
            if done == at:
                os._exit(137)
        return result
    return wrapper


backend.LocalBackend.put = counted(backend.LocalBackend.put)
backend.LocalBackend.delete = counted(backend.LocalBackend.delete)
try:
    main(sys.argv[2:])
finally:
    if at < 0:
        print(f"crashpoint: {done} operations", file=sys.stderr)

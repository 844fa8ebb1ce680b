"""`python -m gemma4.parallel SPEC`: a tensor-parallel follower started by gemma4.parallel.launch."""
import sys

from . import _follower_main

if __name__ == "__main__":
    _follower_main(sys.argv[1])

"""`python -m pipeline.supervise` (`alum supervise`), as the scripts in launch/ run it: the entry point
kept at its documented name; the code is pipeline.train.supervise."""

from pipeline.train.supervise import main

if __name__ == "__main__":
    import sys

    sys.exit(main())

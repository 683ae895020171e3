"""`python -m segment_deeplab` runs the `deeplab` command line."""

from segment_deeplab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m effsr``: the same command-line interface as the ``effsr`` console script."""
from effsr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

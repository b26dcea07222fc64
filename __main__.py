"""``python -m bioplaus``: the same command line as ``bioplaus``."""

from bioplaus.orchestrator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

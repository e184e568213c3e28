"""`python -m orchestration ...` is the same as the `raylm` console script."""

from orchestration.cli import main

raise SystemExit(main())

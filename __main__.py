"""`python -m slipstream …` — the headless runner (see runner/cli.py)."""

from .runner.cli import main

raise SystemExit(main())

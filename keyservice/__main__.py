"""``python -m keyservice`` runs the CLI."""

from keyservice.cli import main

raise SystemExit(main())

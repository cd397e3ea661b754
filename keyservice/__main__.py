"""``python -m keyservice`` runs the CLI."""

from keyservice.cli.main import main

raise SystemExit(main())

"""``python -m keyservice`` runs the CLI."""

from keyservice.cli.entry import main

raise SystemExit(main())

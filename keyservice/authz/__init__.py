"""Authorization: ``policy`` evaluates key and identity policies and grants (pure: no store, no
I/O); ``authorize`` gathers what a decision needs and is the one allow/deny entry point."""

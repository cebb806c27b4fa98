"""``python -m cartosplit``: the command line."""

from cartosplit.cli import main

raise SystemExit(main())

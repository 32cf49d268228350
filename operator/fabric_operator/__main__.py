"""`python -m fabric_operator` is the `fabric-operator` command."""

from fabric_operator.cli import main

raise SystemExit(main())

"""`python -m softprompt.cli ...` (how pipeline steps and Ray Jobs run the command)."""

from softprompt.cli.main import main

raise SystemExit(main())

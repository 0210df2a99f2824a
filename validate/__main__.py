"""``python -m validate``: regenerate every experiment, macros and manifest (see validate.all)."""

from validate.all import main

raise SystemExit(main())

from criteriapo.cli import main

raise SystemExit(main())

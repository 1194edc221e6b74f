from mcmw.cli import main

raise SystemExit(main())

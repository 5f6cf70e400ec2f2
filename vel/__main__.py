from vel.cli import main

raise SystemExit(main())

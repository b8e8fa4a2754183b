from neuroplastic.cli import main

raise SystemExit(main())

from multiverso_py.cli import main

raise SystemExit(main())

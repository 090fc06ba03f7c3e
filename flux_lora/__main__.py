from flux_lora.cli import main

raise SystemExit(main())

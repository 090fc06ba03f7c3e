from flux_lora.serving.cli import main

raise SystemExit(main())

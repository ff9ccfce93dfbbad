from dicom_node.app.cli import main

raise SystemExit(main())

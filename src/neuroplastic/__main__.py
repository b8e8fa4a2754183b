from neuroplastic.cli import entry

raise SystemExit(entry())

"""hive: the daemon of one machine (see README.md, Layout)."""

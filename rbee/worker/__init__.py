"""worker: one process per loaded model, started by a hive."""

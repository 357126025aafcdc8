"""keeper: the CLI's side (finding a hive, a job's events, the verbs)."""

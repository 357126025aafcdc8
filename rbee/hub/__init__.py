"""Models from the Hugging Face Hub: references, metadata and rbee's own resumable transfer.

From pure to effectful, each module small enough to read in one sitting:

* :mod:`rbee.hub.refs` parses ``hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]`` and picks the GGUF
  file(s) of a repo (pure functions, no I/O);
* :mod:`rbee.hub.client` asks the Hub (through huggingface_hub) which files a revision holds,
  pinned to a commit, with their size and sha256, and turns the Hub's errors into rbee's;
* :mod:`rbee.hub.layout` says where files live under a models directory, with their part files
  and sidecars, checks free disk space and cleans up stale parts;
* :mod:`rbee.hub.transfer` moves one file's bytes: Range resumes across restarts, retries,
  stall detection, sha256 verification and an atomic rename;
* :mod:`rbee.hub.download` shares transfers between callers (``DownloadManager``) and ties it
  all together in ``pull``, which is what a hive calls.
"""

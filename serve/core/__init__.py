"""The engine core: requests become sequences, scheduled over paged KV caches and run on the compiled program."""

"""One module per source kind; each provides a runner stage that writes `shards/`."""

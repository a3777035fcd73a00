"""One replica's long-lived state, shared by every room: its clients (Runtime), the hot-path address cache and activity batcher, its registry heartbeat."""

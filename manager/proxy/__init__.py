"""The proxy: a client's HTTP and WebSocket traffic to its node, the upstream client, and what headers cross."""

"""The edge: what every request meets first: connection bounds (protocol), client API keys, the one error-to-HTTP mapping and JSON answers."""

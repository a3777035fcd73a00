"""The session API: the XAgent routes (get_cookie, reconnect, close, release, alive, ready), their internal forwards between replicas, and cookie to node resolution."""

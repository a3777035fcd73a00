"""Forks and snapshots: a session's own routes (cookie), the admin API's (by id) and the owner's internal ones."""

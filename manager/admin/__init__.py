"""The admin API under /admin: the bearer token, its failure limiter, cluster-wide reads fanned out to every manager_id."""

"""Node operations: the one layer the manager and the checker both stand on.

Create, restart, stop, release, the warm pool's claim and refill, and the dispatch of a
lifecycle call to a live replica of the node's owner. Imports only ``shared``.
"""

"""Pure domain model: the platform spec, the tier tables, the inventory and the plan.

Nothing in this package does I/O, so all of it is tested without a server.
"""

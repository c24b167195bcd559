"""The pure core: models, ids, planning, scheduling, coordination and audit hashing.

Nothing in this package reads the clock, touches the network or disk, or uses global random
state; time and seeds are arguments. That is what lets a replay reproduce every decision.
"""

"""Replicas: several control planes serving one fleet, sharing state through Redis.

In: a Redis URL (`serve --redis`). Out: every replica serves the same overlay (drains,
endpoint edits), the same weight table (computed by one leader at a time, fenced) and
sees the fleet-wide load. `link` (the connection, its health and the event channel),
`overlay` (the shared admin overlay), `leader` (the lease with its fencing token),
`weights` (the weight table: the leader writes, every replica serves), `load` (each
replica's merged LRS windows, published for the others).
"""

"""Database edges: the audit store the sink writes and `audit verify`, `replay` and `report` read.

Only this package imports database drivers; the domain never sees a connection.
"""

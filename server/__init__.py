"""The server's parts beside its spine (sim_server.py): simulator processes as the loop sees them,
simulator catalogs, TCP connections and CURVE, the dashboard, and process plumbing.

Nothing here registers a socket on the poll loop's poller or answers a request: the loop does.
"""

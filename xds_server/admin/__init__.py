"""Admin HTTP API: state, changes to pools (drain, add, remove), metrics and the status page."""

from xds_server.admin.api import AdminApi, start_admin

__all__ = ["AdminApi", "start_admin"]

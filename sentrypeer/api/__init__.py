"""SentryPeer's REST API on ``twisted.web`` (``-a``; interface.md §5, reference §5).

- :func:`make_site`: the :class:`twisted.web.server.Site` to listen with.
- :func:`check_token`: the token check (Bearer, or Basic with the token as password) for the
  dashboard.
"""

from sentrypeer.api.resources import check_token
from sentrypeer.api.site import make_site

__all__ = ["check_token", "make_site"]

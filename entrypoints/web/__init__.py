"""The web console: server-rendered pages (Jinja2) under the same Falcon app as the API, calling
the same operation table with the signed-in user as caller (see docs/web.md)."""

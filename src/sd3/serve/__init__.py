"""`sd3 serve`: an HTTP server for one model, loaded once.

`command.py` (the CLI and uvicorn), `app.py` (the ASGI app and its guards), `a1111.py` (the
AUTOMATIC1111 API), `native.py` (sd3's job API, progress events, images, history),
`service.py` (requests -> checked jobs), `jobs.py` (queue, batching, the worker),
`history.py` (SQLite), `preview.py` (step previews), `static/` (the page). docs/serve.md
describes them.
"""

"""`vgclip serve`: the web app and JSON API (needs the `serve` extra: FastAPI, uvicorn, python-multipart).

Nothing is imported here, so `import vgclip.serve.report` and the CLI stay light.
"""

"""`vgclip serve`: the web app and JSON API (needs the `serve` extra: FastAPI, uvicorn, python-multipart).

Nothing is imported here, so `import vgclip.serve.report_folder` and the CLI stay light.
"""

"""The HTTP service: FastAPI app, routes, schemas, the web page and the omniattr CLI."""

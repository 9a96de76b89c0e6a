"""HTTP routes, one module per resource; routes are thin: they call `api.usecases` and convert with `views`."""

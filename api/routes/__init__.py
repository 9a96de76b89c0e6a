"""HTTP routes, one module per resource; routes are thin and call `api.services` and `store.metadata`."""

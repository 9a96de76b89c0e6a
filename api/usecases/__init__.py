"""What the API does, one module per domain (collections, images, search, jobs, generations, keys); routes call
these and nothing below them. Each use case opens its own session and returns everything its caller needs."""

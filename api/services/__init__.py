"""Between the routes and the repository: what the API does, without HTTP and without commits."""

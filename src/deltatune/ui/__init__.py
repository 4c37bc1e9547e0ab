"""`deltatune ui`: the local web app (runs, launch, compare, playground); static files, no build step."""

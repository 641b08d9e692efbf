"""``python -m sphx``: the command line without relying on the console script."""

from .cli import main

if __name__ == "__main__":  # spawned dask workers re-import this module: never re-run the CLI there
    main()

"""``python -m jaxent.bench``: see :mod:`jaxent.bench.cli`."""

from jaxent.bench.cli import main

if __name__ == "__main__":
    main()

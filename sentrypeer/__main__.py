"""``python3 -m sentrypeer``: the same as the ``sentrypeer`` console script."""

from sentrypeer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

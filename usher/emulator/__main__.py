"""``python -m usher.emulator``: see ``usher.emulator.cli``."""

from usher.emulator.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())

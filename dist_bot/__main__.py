"""`python -m dist_bot ...` (also what `torchrun -m dist_bot train ...` runs)."""

from dist_bot.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

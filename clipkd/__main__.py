"""``python -m clipkd`` (also what ``torchrun -m clipkd`` runs)."""

from clipkd.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())

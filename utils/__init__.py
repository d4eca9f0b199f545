"""What every package uses: atomic files (files.py), the user-facing error type (errors.py), distributed helpers
(distributed.py)."""

"""Evaluate a CFine checkpoint. Not implemented yet: evaluation arrives with the train/test issue."""
import sys

if __name__ == "__main__":
    sys.exit("test.py is not implemented yet (see the open train/test issue).")

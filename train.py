"""Train CFine. Not implemented yet: the training loop arrives with the train/test issue."""
import sys

if __name__ == "__main__":
    sys.exit("train.py is not implemented yet (see the open train/test issue); the model and data code are under models/ and datasets/.")

"""Data sets, model builders and the training loop."""

# The datasets ``dataset.name`` may name; kept free of torch so that a space is read and checked without it.
DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "imagefolder")

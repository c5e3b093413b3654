"""``python -m trainer`` / ``accelerate launch -m trainer``."""

from trainer.cli import entry_point

if __name__ == "__main__":
    entry_point()

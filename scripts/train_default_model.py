"""Reproduce the embedded default model: see safe_dit/embedded/train.py and the model card in README."""
from safe_dit.embedded.train import main

if __name__ == "__main__":
    raise SystemExit(main())

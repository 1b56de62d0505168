"""Reproduce the embedded default model: see safe_dit/train.py and the model card in README."""
from safe_dit.train import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Train the embedded moving-shapes video model: see safe_dit/embedded/train_video.py and its training.json."""
from safe_dit.embedded.train_video import main

if __name__ == "__main__":
    raise SystemExit(main())

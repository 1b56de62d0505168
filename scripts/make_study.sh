#!/usr/bin/env bash
# Remakes studies/dense-fp-vs-safe-core/ (24 pairs, embedded model, 30 steps; safe-core at SafeConfig's current defaults, recorded in its manifest.json).
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m safe_dit.cli study make --a dense-fp --b safe-core --single 12 --two 12 --seed 0 --steps 30 --out studies/dense-fp-vs-safe-core --overwrite "$@"

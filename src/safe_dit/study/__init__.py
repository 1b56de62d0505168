"""A blinded pairwise human study of two settings: ``make`` (paired images and a manifest), ``serve`` (the
rating page, votes in SQLite), ``report`` (preference rates, a non-inferiority test, per prompt).

The study folder is the unit a person hands on: ``manifest.json`` (both settings in full, every prompt and
seed, each image's sha256), ``images/`` (opaque names: neither the file name nor the URL says which setting
made an image), and, once served, ``votes.sqlite``.
"""

MANIFEST = "manifest.json"
IMAGES = "images"
VOTES = "votes.sqlite"
FORMAT = "safe-dit study 1"

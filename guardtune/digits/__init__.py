"""The embedded model's domain: handwritten digits, from data to a trained pipeline.

`dataset` (scikit-learn's digits as text-to-image pairs, styles, export), `classifier` (the
yardstick for "is this a recognisable digit"), `bpe` (the tokenizer's merges), `build` (the
recipe that trains the embedded `digits` pipeline and its policy) and `demo` (`make demo`).
The product code (trust, enforcement, training) does not depend on this package; `evaluate`'s
digit scorer and the CLI's `data digits` do.
"""

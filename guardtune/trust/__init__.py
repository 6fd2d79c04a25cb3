"""The trust chain: which exact weights a policy binds, who signed it, and whether to believe it.

`fingerprint` (tensor digests of a model as stored) -> `build` (a frozen list bound to a
fingerprint, as an unsigned `policy`) -> `signing` (DSSE envelopes, keys) -> `keys` (which
public keys are trusted) -> `verify` (all of it checked, failing closed) -> `inspection`
(where a policy freezes, for `policy show`). Enforcement (`guardtune.enforce`) starts from a
`VerifiedPolicy`.
"""

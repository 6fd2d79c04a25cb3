"""Enforcing a verified policy: `freeze` (what trains), `guard` (proof during training that
no frozen tensor moved), `audit` (proof on a derivative, by any tool) and `keynames` (the
tensor and module names derivatives come in)."""

"""Enforcement of freeze policies on loaded models (freezing, guards); filled by later issues."""

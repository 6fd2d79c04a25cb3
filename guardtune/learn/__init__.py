"""Mask learners for publishers: FreezeAsGuard's bilevel learner and the random baseline."""

"""`guardtune evaluate`: what a policy buys, measured against the baselines.

tasks (the data folders, split and encoded) -> defenses (what each method does to the model
before the user gets it) -> attack (the same simulated user fine-tune for every method) ->
metrics (scoring the samples it then draws) -> journal (every finished run, so a rerun resumes)
-> run (the plan over methods, seeds and tasks, its summary, JSON and plot).
"""

"""The stages of a run, in the order `nvib.workflow.run.Run` calls them: validation -> prior -> search -> baselines
-> evaluation -> report (and the few-shot prompt's start-up check). Each stage is a function of the run's inputs
(`inputs.RunInputs`: config, model, data, prompt, console) and its run directory that returns its product, so that
it can be read, tested and rerun alone; `records` (the run directory's files and identity) and `studies` (what the
knob and baseline searches share) hold what they have in common.
"""

"""The planner: dials + hardware + model and data facts -> a RunPlan, and the DeepSpeed config
rendered from it. `resolve.py` makes every decision, with its reason; the other modules each
own one part of it (the ZeRO memory model, the hardware probe, the recipes, the data streams,
the fault settings, the objective's declared options) and `deepspeed_config.py` turns the
finished plan into DeepSpeed's JSON.
"""

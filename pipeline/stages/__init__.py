"""The DAG's stages, one module each, in the order pipeline/run.py wires them: describe, pretrain, caches,
calibrate, finetune, evaluate, publish. Each owns its cache key and version, calls its Ray tasks (tasks/, of the
same name) with keyword arguments, and gives the driver one function per step."""

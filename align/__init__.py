"""secondstage alignment: turn logged feedback into a new LoRA model version.

`secondstage align run` reads unused feedback from Redis, builds TRL datasets
(KTO from thumbs, DPO from corrections, preferred choices and policy rewrites),
trains a LoRA adapter, gates it, writes a version directory and publishes it.
"""

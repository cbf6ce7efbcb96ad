"""Model folders (``trained-llama/`` and its fine-tunes) and the scripts that make the fine-tunes.

``block_attention`` builds training sequences made of independently encoded chunks and runs the model
over them exactly as the blender reuses chunk KV; ``finetune_block_attention`` continues training a
model folder with those sequences mixed with ordinary causal windows (``python -m
jobs.models.finetune_block_attention --help``).
"""

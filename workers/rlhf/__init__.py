"""RLHF stages (InstructGPT): SFT, reward model on K-way rankings, PPO with KL and ptx.

``ppo_math`` holds the pure tensor functions; ``reference`` runs the whole
recipe in one process with plain PyTorch, from step functions that DeepSpeed
workers reuse with their engines.
"""

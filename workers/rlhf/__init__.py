"""RLHF stages (InstructGPT): SFT, reward model on K-way rankings, PPO with KL and ptx.

``ppo_math`` holds the pure tensor functions and ``ppo_config`` the one PPO
config; ``steps`` the batches and step functions the DeepSpeed stages
(``stages``, on ``datasets``) and the single-process ``reference`` share;
``report`` measures a finished pipeline.
"""

"""Adapter initialisation from the training data: EVA, CorDA and LoRA-GA (``init_lora_weights``).

The method math is numpy, one file each (``eva``, ``corda``, ``lora_ga``); ``statistics`` gathers
what they read in graph mode (input statistics or weight gradients of the target cells);
``runner`` runs a pass and applies the result to the adapter layers; ``callback`` is the
``DataDrivenInit`` trainer callback that does it when training begins (after MindFormers has
built the network, wrapped it and loaded the base checkpoint).
"""

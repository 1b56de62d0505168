"""The names the benchmark commands offer as choices, torch-free so their parsers build in milliseconds (the
modules that measure import them from here)."""

MIDT_MASKS = ("bool-full", "bool-expanded", "additive-zero", "additive-rowconst", "key-padding")
PARETO_FAMILIES = ("safe-dit", "ablation", "peer", "steps")
E2E_PROMPT_VALID = (20, 3)  # bench e2e --prompts 2: valid caption tokens of the (prompt, negative prompt) pair

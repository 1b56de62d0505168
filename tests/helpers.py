"""Shared test instruments: what reaches SDPA, and the processors a model holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from safe_dit.testing.kits import KITS, kit_for


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def processors(model) -> dict:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


class SdpaSpy(TorchFunctionMode):
    """Every mask handed to F.scaled_dot_product_attention (``None`` for a mask-free call)."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


def stock_vs_dense_fp(model, inputs, flash: bool = True):
    """One forward of the stock model and one under dense-fp (on the flash kernel alone: it raises if a call needed
    another), each under an SdpaSpy; safe-dit removed after. Returns (dense, fast, stock masks, dense-fp masks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit

    with SdpaSpy() as stock:
        dense = forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    try:
        with SdpaSpy() as spy, sdpa_kernel([SDPBackend.FLASH_ATTENTION] if flash else list(SDPBackend)):
            fast = forward(model, inputs).float()
    finally:
        remove_safe_dit(model)
    return dense, fast, stock.masks, spy.masks


# -- one seeded sampling run per backbone's tiny pipeline (embeds given, latents out) -------------------

def seeded(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _draw(prompt_seed: int, negative_seed: int | None):
    """A kit's ``draw``: the i-th tensor drawn is seeded i + 1, the prompt's ``prompt_seed``, the negative
    prompt's ``negative_seed`` when given."""
    count = iter(range(1, 100))

    def draw(role, *shape):
        seed = next(count)
        if role == "prompt":
            seed = prompt_seed
        elif role == "negative" and negative_seed is not None:
            seed = negative_seed
        return seeded(seed, *shape)

    return draw


def runner(name: str):
    """The seeded sampling run of kit ``name``'s tiny pipeline: captions of 8 tokens (6 / 2 valid where padded),
    its ``tiny_run`` size and guidance, latents out; keywords override the call's."""
    kit = kit_for(name)

    def run(pipe, steps=10, height=kit.tiny_run.height, width=kit.tiny_run.width, prompt_seed=1, negative_seed=None,
            **kw):
        args = kit.prompt_kwargs(pipe.transformer, _draw(prompt_seed, negative_seed), 8, (6, 2))
        args.update(height=height, width=width, num_inference_steps=steps, output_type="latent")
        if kit.tiny_run.guidance is not None:
            args["guidance_scale"] = kit.tiny_run.guidance
        if kit.tiny_run.frames is not None:
            args["num_frames"] = kit.tiny_run.frames
        args.update(kw)
        out = pipe(generator=torch.Generator().manual_seed(0), **args)
        return out.frames if kit.tiny_run.frames is not None else out.images

    run.__name__ = "run_" + name.replace("-", "_")
    return run


RUNS = {name: runner(name) for name in KITS}
run_lumina = RUNS["lumina-next"]  # CFG batch [cond; uncond], padded captions
run_pixart = RUNS["pixart"]  # CFG batch [uncond; cond], T5-like padded captions
run_sd3 = RUNS["sd3"]  # CFG batch [uncond; cond], joint text
run_flux = RUNS["flux"]  # batch 1 (guidance-distilled), joint text


# -- bare-transformer checks shared by the joint-attention backbones (SD3, FLUX) ----------------------

def steps_vs_dense_fp(model, inputs, num_steps=4):
    """dense-fp output, then ``num_steps`` safe-core forwards (keep 0.3, warm-up 1, anchor every 2, no tail) on
    the flash kernel only; returns (dense-fp output, the generation, the safe-core outputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import safe_dit
    from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit

    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense = forward(model, inputs)
    apply_safe_dit(model,
                   SafeConfig("safe-core", keep_ratio=0.3, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
    with (torch.no_grad(), safe_dit.generation(model, num_steps=num_steps) as g,
          sdpa_kernel([SDPBackend.FLASH_ATTENTION])):
        outs = [model(**inputs)[0] for _ in range(num_steps)]  # PCSP tap, anchors and selective steps
    remove_safe_dit(model)
    return dense, g, outs


def selective_flops(model, inputs, keep_ratios=(1.0, 0.25)) -> dict:
    """FLOPs of one selective safe-core forward per keep ratio."""
    from torch.utils.flop_counter import FlopCounterMode

    import safe_dit
    from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit

    flops = {}
    for keep in keep_ratios:
        apply_safe_dit(model,
                       SafeConfig("safe-core", keep_ratio=keep, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
        with torch.no_grad(), safe_dit.generation(model, num_steps=3):
            model(**inputs)  # warm-up (also the first anchor)
            with FlopCounterMode(display=False) as counter:
                model(**inputs)  # selective
        flops[keep] = counter.get_total_flops()
    remove_safe_dit(model)
    return flops


def load_benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` (a script, not a package module) so a test can call its functions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

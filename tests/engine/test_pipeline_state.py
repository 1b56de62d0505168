"""Where a generation's steps and CFG batch come from: the pipeline call in progress, never a stale scheduler,
a shared state or a guess from equal latents (the silent-wrong items of the hardening issue)."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.testing.kits import build_lumina_pipeline, build_pixart_pipeline
from safe_dit.testing.tiny import prefix_mask

from helpers import run_lumina, run_pixart, seeded

CORE = SafeConfig("safe-core", keep_ratio=0.25)


@pytest.fixture()
def pipe():
    p = build_lumina_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_a_replaced_scheduler_is_the_one_followed(pipe):
    apply_safe_dit(pipe, CORE)
    reference = run_lumina(pipe, steps=6)
    steps = runtime_of(pipe).last_report["steps"]
    assert "selective" in steps
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # never used before
    assert torch.equal(run_lumina(pipe, steps=6), reference)  # not silently dense, not an IndexError
    assert runtime_of(pipe).last_report["steps"] == steps
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    run_lumina(pipe, steps=3)  # a used one, then another step count: followed as well
    assert len(runtime_of(pipe).last_report["steps"]) == 3


def test_a_second_pipeline_sharing_the_transformer_is_refused_until_applied_to(pipe):
    apply_safe_dit(pipe, CORE)
    other = type(pipe)(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config)})  # from_pipe style: the same transformer, its own scheduler
    with pytest.raises(SafeDitError, match="another pipeline|from_pipe"):
        run_lumina(other, steps=6)
    apply_safe_dit(other, CORE)  # the same config, another pipeline: rebound, not a no-op
    assert torch.equal(run_lumina(other, steps=6), run_lumina(other, steps=6))
    assert "selective" in runtime_of(other).last_report["steps"]


def test_a_direct_transformer_call_after_a_pipeline_run_is_a_clear_error(pipe):
    apply_safe_dit(pipe, CORE)
    run_lumina(pipe, steps=6)
    from safe_dit.testing.kits import lumina_inputs

    with pytest.raises(SafeDitError, match="outside the pipeline's loop"), torch.no_grad():
        pipe.transformer(**lumina_inputs(pipe.transformer, 4, 6, batch=1))


def test_deepcopy_of_a_patched_pipeline_is_refused_and_the_original_keeps_working(pipe):
    apply_safe_dit(pipe, CORE)
    with pytest.raises(SafeDitError, match="deepcopy"):
        copy.deepcopy(pipe)
    assert safe_dit.is_safe_dit_applied(pipe)
    run_lumina(pipe, steps=6)
    assert "selective" in runtime_of(pipe).last_report["steps"]
    remove_safe_dit(pipe)
    copy.deepcopy(pipe)  # the stock pipeline copies as before


def test_pixart_safe_sw_guides_through_a_replaced_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    p = build_pixart_pipeline()
    p.set_progress_bar_config(disable=True)
    apply_safe_dit(p, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=2.0, cfg_sensitive=7.0))
    sw = run_pixart(p, steps=6)
    p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    assert torch.equal(run_pixart(p, steps=6), sw)  # SW-CFG still applied, through the new scheduler
    assert "step" not in vars(p.scheduler)
    remove_safe_dit(p)


def test_two_prompts_with_equal_latents_are_not_taken_for_a_cfg_pair(pipe):
    """Guidance 1 (no CFG), a batch of two prompts drawn from the same latents: each prompt gets its own partition."""
    t = pipe.transformer
    cross, n = t.config.cross_attention_dim, 8
    embeds = torch.cat([seeded(1, 1, n, cross), seeded(2, 1, n, cross)])
    masks = torch.cat([prefix_mask(6, n), prefix_mask(3, n)])
    c = t.config.in_channels
    latent = seeded(5, 1, c, 8, 12)  # 64 x 96 pixels: a 4 x 6 token grid

    def generate(e, m, lat):
        return pipe(prompt_embeds=e, prompt_attention_mask=m, negative_prompt_embeds=torch.zeros_like(e),
                    negative_prompt_attention_mask=m, height=64, width=96, num_inference_steps=6, guidance_scale=1.0,
                    latents=lat, output_type="latent").images

    apply_safe_dit(pipe, CORE)
    both = generate(embeds, masks, latent.expand(2, -1, -1, -1).clone())
    index_both = runtime_of(pipe).last_index.clone()
    alone = generate(embeds[1:], masks[1:], latent.clone())
    index_alone = runtime_of(pipe).last_index.clone()
    assert torch.equal(index_both[1], index_alone[0])  # the second prompt's own partition
    assert torch.allclose(both[1], alone[0], atol=1e-5)


def test_caches_are_released_when_a_step_fails(pipe):
    apply_safe_dit(pipe, CORE)
    rt = runtime_of(pipe)
    block = pipe.transformer.layers[0]
    calls = {"n": 0}

    def fail_at_the_fourth_step(_module, _inputs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("out of memory (simulated)")

    handle = block.register_forward_pre_hook(fail_at_the_fourth_step)
    with pytest.raises(RuntimeError, match="simulated"):
        run_lumina(pipe, steps=6)
    handle.remove()
    assert rt.generation is None  # no K/V caches held until the next call



def test_a_second_call_at_the_last_step_is_refused_as_a_second_call():
    """FLUX true CFG at 2 steps: the last step's first call ends the generation; the second call at that step is
    refused as a second call per step (not as a call outside the pipeline's loop)."""
    from safe_dit.testing.kits import build_flux_pipeline

    from helpers import run_flux

    flux = build_flux_pipeline()
    apply_safe_dit(flux, SafeConfig("safe-core"))
    neg = dict(negative_prompt_embeds=seeded(5, 1, 8, 24), negative_pooled_prompt_embeds=seeded(6, 1, 20),
               true_cfg_scale=2.0)
    with pytest.raises(SafeDitError, match="called it again at step 1"):
        run_flux(flux, steps=2, **neg)
    assert torch.isfinite(run_flux(flux, steps=2)).all()  # the next ordinary call works
